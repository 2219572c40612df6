"""Facts about the machine llmos runs on, and checks of what its native code can safely do here.

Modules in this package import only the standard library (and, in child processes, ``llama_cpp``), so that the edge
bundle's runner, which has no llmos, can ship them.
"""
