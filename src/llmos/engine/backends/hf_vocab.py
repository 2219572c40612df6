"""A Hugging Face tokenizer (``tokenizer.json``) read with the ``tokenizers`` library alone, without transformers.

Contract: :class:`HfVocabulary` turns text into token ids and ids back into the exact bytes they stand for, the way the
engine needs them (:class:`~llmos.engine.backends.base.Backend`'s vocabulary methods): byte-level BPE pieces are mapped
back through GPT-2's byte table, SentencePiece-style pieces turn ``▁`` into a space and ``<0xNN>`` into byte NN,
special tokens give no bytes. End-of-generation tokens come from ``generation_config.json``, ``config.json`` and the
tokenizer config's ``eos_token``. The tokenizer's own padding and truncation settings are switched off: callers decide.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmos.errors import InvalidInputError, ModelLoadError


@functools.cache
def byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character each byte is mapped to, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def piece_bytes(text: str, byte_level: bool) -> bytes:
    """The bytes a vocabulary piece stands for: byte-level BPE through GPT-2's byte table; SentencePiece's ``<0xNN>``
    byte tokens and ``▁`` (a space) otherwise."""
    if byte_level:
        table = byte_decoder()
        return bytes(table.get(ch, 0) for ch in text)
    if text.startswith("<0x") and text.endswith(">") and len(text) == 6:
        return bytes([int(text[3:5], 16)])
    return text.replace("\u2581", " ").encode("utf-8")


def read_json_object(path: Path) -> dict[str, Any]:
    """A model directory's JSON side file as a dict: {} when it is missing or not an object."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path.name}: {exc}") from exc
    return value if isinstance(value, dict) else {}


class HfVocabulary:
    def __init__(self, model_dir: Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - tokenizers comes with the onnx and torch extras
            raise ModelLoadError("reading a tokenizer.json needs the tokenizers package") from exc
        if not (model_dir / "tokenizer.json").is_file():
            raise ModelLoadError(f"{model_dir.name}: no tokenizer.json next to the model")
        try:  # read and parsed once: the tokenizer is built from the same text its decoder and specials are read from
            text = (model_dir / "tokenizer.json").read_text(encoding="utf-8")
            spec = json.loads(text)
            self.tokenizer: Any = Tokenizer.from_str(text)
        except Exception as exc:  # OSError, a JSON error, or the plain Exception tokenizers raises on a bad file
            raise ModelLoadError(f"cannot read tokenizer.json: {exc}") from exc
        spec = spec if isinstance(spec, dict) else {}
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
        self.special = {int(t["id"]) for t in spec.get("added_tokens", []) if t.get("special")}
        tokenizer_config = read_json_object(model_dir / "tokenizer_config.json")
        self.eos: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            source = read_json_object(model_dir / name)
            value = source.get("eos_token_id")
            if isinstance(value, int):
                self.eos.add(value)
            elif isinstance(value, list):
                self.eos.update(int(v) for v in value)
        eos_text = tokenizer_config.get("eos_token")
        eos_text = eos_text.get("content") if isinstance(eos_text, dict) else eos_text
        if isinstance(eos_text, str) and (eos_id := self.tokenizer.token_to_id(eos_text)) is not None:
            self.eos.add(int(eos_id))
        self.size = int(self.tokenizer.get_vocab_size(with_added_tokens=True))
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError("the text is not valid Unicode (it contains a lone surrogate)") from exc
        self.tokenizer.encode_special_tokens = not parse_special
        return list(self.tokenizer.encode(text, add_special_tokens=add_special).ids)

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            special = token in self.special
            piece = b"" if special else piece_bytes(self.tokenizer.id_to_token(token) or "", self.byte_level)
            self._pieces[token] = piece
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")
