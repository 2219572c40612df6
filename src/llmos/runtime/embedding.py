"""A sentence-embedding model loaded with sentence-transformers.

Contract: :meth:`EmbeddingModel.embed` encodes a batch of texts into float32 vectors exactly as
``SentenceTransformer.encode`` would (the model's own pooling and normalisation), after refusing any text longer
than the model's ``max_seq_length`` tokens (no silent truncation). Calls are serialised (one encode at a time);
callers run them in worker threads, never on the event loop.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from llmos.errors import BackendUnavailableError, ContextLengthExceededError
from llmos.registry.views import VersionView


class Embedder(Protocol):
    """What the API uses of an embedding model, in this process (:class:`EmbeddingModel`) or in its own
    (:class:`~llmos.runtime.model_process.ProcessEmbedding`)."""

    kind: str
    max_tokens: int
    dimension: int

    def count_tokens(self, texts: list[str]) -> list[int]: ...

    def truncate(self, texts: list[str]) -> list[str]: ...

    def decode(self, tokens: list[int]) -> str: ...

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]: ...


class EmbeddingModel:
    backend_name = "sentence-transformers"
    kind = "embed"

    def __init__(self, view: VersionView, model_dir: Path, *, threads: int | None = None) -> None:
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # pragma: no cover - depends on installation
            raise BackendUnavailableError("embeddings need `pip install 'llmos[torch]'`") from exc
        if threads:
            torch.set_num_threads(threads)
        self.view = view
        self.model: Any = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
        self.max_tokens = int(self.model.max_seq_length or 512)
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimension = int(dimension() or 0)
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.view.name

    def count_tokens(self, texts: list[str]) -> list[int]:
        encoded = self.model.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        return [len(ids) for ids in encoded]

    def truncate(self, texts: list[str]) -> list[str]:
        """Each text cut to the model's token limit (at the end of the last token that fits)."""
        result = []
        for text, count in zip(texts, self.count_tokens(texts), strict=True):
            if count <= self.max_tokens:
                result.append(text)
                continue
            encoded = self.model.tokenizer(
                text, add_special_tokens=True, truncation=True, max_length=self.max_tokens, return_offsets_mapping=True
            )
            result.append(text[: max((end for _start, end in encoded["offset_mapping"]), default=0)])
        return result

    def decode(self, tokens: list[int]) -> str:
        """Token ids (an embeddings request may send them instead of text) back to text."""
        return str(self.model.tokenizer.decode(tokens))

    @property
    def alive(self) -> bool:
        return self.model is not None

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Vectors ``[len(texts), dimension]`` and the number of tokens they used."""
        counts = self.count_tokens(texts)
        for index, count in enumerate(counts):
            if count > self.max_tokens:
                raise ContextLengthExceededError(
                    f"input[{index}] is {count} tokens; this model embeds at most {self.max_tokens}",
                    param="input",
                )
        with self._lock:
            vectors = self.model.encode(texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32), sum(counts)

    def close(self) -> None:
        self.model = None
