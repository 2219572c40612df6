"""Edge bundles' runtime side: the standalone runner shipped inside every bundle (standard library + ``llama_cpp``)."""
