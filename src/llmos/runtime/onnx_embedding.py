"""A sentence-embedding model on ONNX Runtime (an encoder exported by ``llmos convert --to onnx``, or optimum's).

Contract: :class:`OnnxEmbeddingModel` is an :class:`~llmos.runtime.embedding.Embedder`: the same vectors as the
sentence-transformers original (cosine > 0.999) from a graph that outputs ``sentence_embedding`` (pooling and
normalisation inside the graph) or ``last_hidden_state`` (mean or CLS pooling per ``1_Pooling/config.json`` and L2
normalisation when ``modules.json`` has a Normalize step, applied here). Texts are tokenized with the model's
``tokenizer.json`` (:class:`~llmos.engine.backends.hf_vocab.HfVocabulary`), sorted by length and run in batches of
:data:`BATCH` padded to their longest text. A text longer than ``max_seq_length`` tokens is refused, never silently
cut. Calls are serialised (one run at a time); callers run them in worker threads.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from llmos.engine.backends.hf_vocab import HfVocabulary, read_json_object
from llmos.errors import ContextLengthExceededError
from llmos.formats.onnx import sentence_pooling
from llmos.formats.onnx_session import graph_file, open_session
from llmos.registry.views import VersionView

BATCH = 32


class OnnxEmbeddingModel:
    backend_name = "onnx"
    kind = "embed"

    def __init__(self, view: VersionView, model_dir: Path, *, threads: int | None = None) -> None:
        self.view = view
        self.session: Any = open_session(graph_file(model_dir), threads=threads)
        self.vocab = HfVocabulary(model_dir)
        self._inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        self._output = "sentence_embedding" if "sentence_embedding" in outputs else "last_hidden_state"
        mode, self._normalize = sentence_pooling(model_dir)
        self._cls = mode == "cls_token"
        self.max_tokens = int(read_json_object(model_dir / "sentence_bert_config.json").get("max_seq_length") or 512)
        pad = read_json_object(model_dir / "tokenizer_config.json").get("pad_token")
        self._pad = int(self.vocab.tokenizer.token_to_id(pad) or 0) if isinstance(pad, str) else 0
        self._lock = threading.Lock()
        self.dimension = int(self._run([self._encode("dimension")])[0].shape[0])

    @property
    def name(self) -> str:
        return self.view.name

    @property
    def alive(self) -> bool:
        return self.session is not None

    def _encode(self, text: str) -> Any:
        return self.vocab.tokenizer.encode(text, add_special_tokens=True)

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.vocab.tokenizer.encode_batch(texts, add_special_tokens=True)]

    def truncate(self, texts: list[str]) -> list[str]:
        """Each text cut to the model's token limit (at the end of the last token that fits)."""
        result = []
        for text, encoded in zip(texts, self.vocab.tokenizer.encode_batch(texts), strict=True):
            if len(encoded.ids) <= self.max_tokens:
                result.append(text)
                continue
            ends = [end for _start, end in encoded.offsets[: self.max_tokens - 1]]
            result.append(text[: max(ends, default=0)])
        return result

    def decode(self, tokens: list[int]) -> str:
        return str(self.vocab.tokenizer.decode(tokens))

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Vectors ``[len(texts), dimension]`` and the number of tokens they used."""
        encoded = self.vocab.tokenizer.encode_batch(texts, add_special_tokens=True)
        for index, item in enumerate(encoded):
            if len(item.ids) > self.max_tokens:
                raise ContextLengthExceededError(
                    f"input[{index}] is {len(item.ids)} tokens; this model embeds at most {self.max_tokens}",
                    param="input",
                )
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i].ids))
        vectors = np.zeros((len(texts), self.dimension), np.float32)
        with self._lock:
            for start in range(0, len(order), BATCH):
                chunk = order[start : start + BATCH]
                vectors[chunk] = self._run([encoded[i] for i in chunk])
        return vectors, sum(len(e.ids) for e in encoded)

    def _run(self, batch: list[Any]) -> np.ndarray:
        width = max(len(e.ids) for e in batch)
        ids = np.full((len(batch), width), self._pad, np.int64)
        mask = np.zeros((len(batch), width), np.int64)
        types = np.zeros((len(batch), width), np.int64)
        for row, item in enumerate(batch):
            ids[row, : len(item.ids)] = item.ids
            mask[row, : len(item.ids)] = 1
            types[row, : len(item.ids)] = item.type_ids
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        output = self.session.run([self._output], {n: feeds[n] for n in self._inputs})[0]
        if self._output == "last_hidden_state":
            if self._cls:
                output = output[:, 0]
            else:
                weights = mask[..., None].astype(np.float32)
                output = (output * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
            if self._normalize:
                output = output / np.maximum(np.linalg.norm(output, axis=1, keepdims=True), 1e-12)
        return np.asarray(output, dtype=np.float32)

    def close(self) -> None:
        self.session = None
