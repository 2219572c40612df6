#!/usr/bin/env python3
"""The llmos edge runner: serve one exported model with an OpenAI-compatible chat route, needing only llama-cpp-python.

``llmos export NAME --target edge --out DIR`` copies this file into the bundle as ``run_edge.py`` next to
``model.gguf``, ``chat_template.json`` and ``manifest.json``. On the device::

    pip install llama-cpp-python
    python run_edge.py --port 8080

Contract:

* It imports only the standard library and, once a model is served, ``llama_cpp`` (whose own dependency Jinja2
  renders the chat template through ``llama_cpp.llama_chat_format.Jinja2ChatFormatter``), plus the bundle's
  ``llamacpp_probe.py``. It never imports llmos, so it runs in a virtual environment that has nothing but
  llama-cpp-python.
* Before llama.cpp loads, ``--extra-buffers auto`` (the default) checks llama.cpp's fast CPU path once per machine
  and build in a child process (``llamacpp_probe.py``; the verdict is kept under ``--probe-cache``) and runs the safe
  path, saying why in one line, where the fast one crashes or computes wrong numbers (CPUs that advertise AMX
  without running it). ``on`` / ``off`` (or ``LLMOS_LLAMACPP_EXTRA_BUFFERS=1`` / ``0``) decide without the check.
* Before loading anything it checks every file the manifest lists (regular file, size, sha256) and refuses to start
  on any difference with one line on stderr and exit code 1 (``--no-verify`` skips the hashes; ``--verify-only``
  checks and exits). Manifest paths are plain relative names inside the bundle, never absolute or ``..``, and are
  followed one component at a time: a symbolic link anywhere on the way (a directory pointing out of the bundle) is
  refused. JSON (the manifest, the template, request bodies) nested deeper than ``MAX_JSON_DEPTH`` is refused.
* Prompts are built the way llmos builds them: the bundle's chat template (the one llmos used for this version) with
  the model's BOS/EOS token texts, then tokenized with special tokens parsed and a BOS added unless the text already
  starts with it; ``developer`` messages count as ``system``. Sampling follows the OpenAI defaults
  (``temperature=1``, ``top_p=1``; ``temperature=0`` is greedy), ``max_tokens`` defaults to the rest of the context,
  ``stop`` strings are applied on text and never split across chunks, and generation ends at an end-of-generation
  token (``finish_reason`` ``stop``) or at the limit (``length``).
* Routes: ``POST /v1/chat/completions`` (JSON or SSE chunks, ``usage`` in the body and, with
  ``stream_options.include_usage``, as a last chunk), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``.
  Errors have the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``: 400 for bad input (and for
  OpenAI features this runner does not have: ``n > 1``, logprobs, tools, JSON modes), 401 without the
  ``--api-key``, 404 for unknown routes and models, 405, 411, 413.
* It binds 127.0.0.1 unless ``--host`` says otherwise, and refuses a non-loopback address without ``--api-key``.
  One request generates at a time (llama.cpp contexts are not thread-safe); others wait their turn.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import hmac
import ipaddress
import json
import math
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import accumulate
from pathlib import Path
from typing import Any, Protocol

BUNDLE_FORMAT = "llmos.edge.v1"
MANIFEST_NAME = "manifest.json"
PROBE_FILE = "llamacpp_probe.py"  # the fast-path probe (llmos.machine.llamacpp_probe), shipped beside this runner
MAX_MANIFEST_BYTES = 1_000_000
MAX_TEMPLATE_BYTES = 1_000_000
MAX_FILES = 64
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_STOP = 4
MAX_MESSAGES = 10_000
DEFAULT_PORT = 8080
DEFAULT_CTX = 4096
CHUNK = 1 << 20
MAX_JSON_DEPTH = 64  # llmos.formats.safe_json uses this limit and json_depth too
_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_JSON_STEP = [1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256)]
ROLES = ("system", "developer", "user", "assistant", "tool")


class BundleError(Exception):
    """The bundle is incomplete, malformed or does not match its manifest."""


class RequestError(Exception):
    """A request the runner refuses; becomes an OpenAI-shaped error body."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str = "invalid_input",
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- the bundle: manifest and verification --------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safe_relative(value: object) -> str:
    """A manifest path: ``name`` or ``dir/name`` made of plain parts; anything else raises :class:`BundleError`."""
    if isinstance(value, str) and 0 < len(value) <= 400 and all(_SAFE_PART.match(p) for p in value.split("/")):
        return value  # every part starts with a letter or digit: no "", ".", ".." or hidden names
    raise BundleError(f"manifest file path {value!r} is not a plain relative path")


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text, found without recursion (brackets in strings do not
    count). ``llmos.formats.safe_json`` uses it too; this file imports nothing from llmos."""
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_JSON_STEP.__getitem__, brackets)), default=0)


def parse_json(data: bytes) -> Any:
    """JSON text -> value; ValueError (also for invalid UTF-8 and nesting deeper than ``MAX_JSON_DEPTH``)."""
    if data.count(b"[") + data.count(b"{") > MAX_JSON_DEPTH and json_depth(data) > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError as exc:  # not reached after the depth check
        raise ValueError("JSON nested too deeply") from exc


def bundle_file(root: Path, relative: str) -> Path:
    """``root/relative``, followed one component at a time: any symbolic link on the way raises BundleError."""
    path = root
    for part in safe_relative(relative).split("/"):
        path = path / part
        if path.is_symlink():
            raise BundleError(f"{relative} is missing (or not a regular file): {part} on its path is a symbolic link")
    return path


def read_json(path: Path, limit: int) -> Any:
    try:
        if path.is_symlink() or not path.is_file():
            raise BundleError(f"{path.name} is missing (or not a regular file)")
        if path.stat().st_size > limit:
            raise BundleError(f"{path.name} is larger than {limit} bytes")
        return parse_json(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path.name} cannot be read: {exc}") from exc


def load_manifest(root: Path) -> dict[str, Any]:
    """The bundle's manifest, checked for shape: the format marker, the model, and a list of safe file entries."""
    manifest = read_json(root / MANIFEST_NAME, MAX_MANIFEST_BYTES)
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{MANIFEST_NAME} is not an llmos edge bundle manifest (format {BUNDLE_FORMAT!r})")
    files = manifest.get("files")
    if not isinstance(files, list) or not files or len(files) > MAX_FILES:
        raise BundleError(f"{MANIFEST_NAME} must list between 1 and {MAX_FILES} files")
    seen: set[str] = set()
    for entry in files:
        if not isinstance(entry, dict):
            raise BundleError(f"{MANIFEST_NAME}: every file entry must be an object")
        path = safe_relative(entry.get("path"))
        size, digest = entry.get("size"), entry.get("sha256")
        if path == MANIFEST_NAME or path in seen:
            raise BundleError(f"{MANIFEST_NAME}: file {path!r} is listed twice or names the manifest itself")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BundleError(f"{MANIFEST_NAME}: file {path!r} has no valid size")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise BundleError(f"{MANIFEST_NAME}: file {path!r} has no valid sha256")
        seen.add(path)
    model = manifest.get("model")
    if not isinstance(model, dict) or model.get("file") not in seen or model.get("chat_template") not in seen:
        raise BundleError(f"{MANIFEST_NAME}: model.file and model.chat_template must name listed files")
    if not isinstance(manifest.get("name"), str) or not manifest["name"]:
        raise BundleError(f"{MANIFEST_NAME}: the model has no name")
    return manifest


def bundle_problems(root: Path, manifest: dict[str, Any], *, hashes: bool = True) -> list[str]:
    """Every difference between the files on disk and the manifest, one short sentence each (empty: all match)."""
    problems: list[str] = []
    for entry in manifest["files"]:
        try:
            path = bundle_file(root, entry["path"])
        except BundleError as exc:
            problems.append(str(exc))
            continue
        if path.is_symlink() or not path.is_file():
            problems.append(f"{entry['path']} is missing (or not a regular file)")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(f"{entry['path']} has {size} bytes, the manifest says {entry['size']}")
        elif hashes and sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['path']} does not match its sha256 in the manifest")
    return problems


def verify_bundle(root: Path, *, hashes: bool = True) -> dict[str, Any]:
    """Load and check the bundle at ``root``; returns its manifest or raises :class:`BundleError` (one line)."""
    manifest = load_manifest(root)
    problems = bundle_problems(root, manifest, hashes=hashes)
    if problems:
        raise BundleError("; ".join(problems))
    return manifest


def is_bundle(path: Path) -> bool:
    """Whether ``path`` is a directory whose manifest carries the edge bundle marker (contents not yet checked).

    A manifest that names the marker but cannot be parsed (malformed, nested too deeply) counts as a bundle, so that
    importing it is refused by :func:`verify_bundle` with the reason rather than taken for another kind of directory.
    """
    try:
        data = read_json(path / MANIFEST_NAME, MAX_MANIFEST_BYTES) if path.is_dir() else None
    except BundleError:
        try:
            manifest = path / MANIFEST_NAME
            small = manifest.is_file() and not manifest.is_symlink() and manifest.stat().st_size <= MAX_MANIFEST_BYTES
            return small and f'"{BUNDLE_FORMAT}"'.encode() in manifest.read_bytes()
        except OSError:
            return False
    return isinstance(data, dict) and data.get("format") == BUNDLE_FORMAT


# --- the chat template ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatTemplate:
    """The Jinja chat template llmos used for the model, and the token texts it may refer to."""

    template: str
    bos_token: str = ""
    eos_token: str = ""

    @classmethod
    def load(cls, path: Path) -> ChatTemplate:
        data = read_json(path, MAX_TEMPLATE_BYTES)
        if not isinstance(data, dict) or not isinstance(data.get("template"), str) or not data["template"]:
            raise BundleError(f"{path.name} holds no chat template")
        bos, eos = data.get("bos_token"), data.get("eos_token")
        return cls(data["template"], bos if isinstance(bos, str) else "", eos if isinstance(eos, str) else "")

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for ``messages`` with the generation prompt appended; bad messages raise RequestError."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        try:
            formatter = Jinja2ChatFormatter(self.template, eos_token=self.eos_token, bos_token=self.bos_token)
            turns: list[Any] = list(messages)
            rendered: Any = formatter(messages=turns)
            return str(rendered.prompt)
        except Exception as exc:  # the template's raise_exception, or Jinja errors on odd input
            raise RequestError(f"the model's chat template rejected the messages: {exc}", param="messages") from exc


# --- requests -------------------------------------------------------------------------------------------------------


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)


def _number(
    body: dict[str, Any], key: str, default: float, low: float, high: float, *, open_low: bool = False
) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{key} must be a number", param=key)
    if value < low or value > high or (open_low and value == low):
        bound = "(" if open_low else "["
        raise RequestError(f"{key} must be in {bound}{low}, {high}]", param=key)
    return float(value)


def _integer(body: dict[str, Any], key: str, low: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RequestError(f"{key} must be an integer >= {low}", param=key)
    return value


def _content(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError("only text content parts are supported", param=f"messages.{index}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError("message content must be a string or a list of text parts", param=f"messages.{index}.content")


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a chat completion body (types strictly, ranges as in the OpenAI reference) into a ChatRequest."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise RequestError("model is required", param="model")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw or len(raw) > MAX_MESSAGES:
        raise RequestError("messages must be a non-empty list of messages", param="messages")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(f"messages.{i}.role must be one of {', '.join(ROLES)}", param=f"messages.{i}.role")
        role = "system" if message["role"] == "developer" else message["role"]
        messages.append({"role": role, "content": _content(message, i)})
    if not isinstance(body.get("stream", False), bool):
        raise RequestError("stream must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and (
        not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)
    ):
        raise RequestError("stream_options.include_usage must be a boolean", param="stream_options")
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise RequestError("the edge runner generates one choice per request (n=1)", param="n")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        raise RequestError("logprobs are not supported by the edge runner", param="logprobs")
    if body.get("tools") or body.get("functions"):
        raise RequestError("tools are not supported by the edge runner", param="tools")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise RequestError("only response_format type 'text' is supported by the edge runner", param="response_format")
    stop = body.get("stop")
    stops: tuple[str, ...] = ()
    if isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP:
        stops = tuple(stop)
    elif stop is not None:
        raise RequestError(f"stop must be a string or a list of at most {MAX_STOP} strings", param="stop")
    limit = _integer(body, "max_completion_tokens", 1)
    return ChatRequest(
        model=body["model"],
        messages=messages,
        stream=bool(body.get("stream", False)),
        include_usage=bool(options and options.get("include_usage")),
        max_tokens=limit if limit is not None else _integer(body, "max_tokens", 1),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        top_k=_integer(body, "top_k", 0) or 0,
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        repeat_penalty=_number(body, "repeat_penalty", 1.0, 0.0, 10.0, open_low=True),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        seed=_integer(body, "seed", -(2**63)),
        stop=tuple(s for s in stops if s),
    )


# --- text out -------------------------------------------------------------------------------------------------------


class TextStream:
    """Token bytes in, text out: incomplete UTF-8 waits for its next bytes; text that may begin a stop string is
    held back until it is clear, and text from a stop string on is never released."""

    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self.stops = stops
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Add bytes; returns the text that is safe to send now (sets :attr:`stopped` when a stop string appeared)."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(data)
        cut = min((i for i in (self._held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            text, self._held = self._held[:cut], ""
            return text
        keep = max((self._overlap(s) for s in self.stops), default=0)
        text = self._held[: len(self._held) - keep]
        self._held = self._held[len(text) :]
        return text

    def _overlap(self, stop: str) -> int:
        for size in range(min(len(stop) - 1, len(self._held)), 0, -1):
            if self._held.endswith(stop[:size]):
                return size
        return 0

    def finish(self) -> str:
        """The held-back rest once generation ended without a stop string."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text


# --- the model ------------------------------------------------------------------------------------------------------


class Engine(Protocol):
    """What the server needs from a model; :class:`LlamaEngine` is the real one, tests pass a fake."""

    n_ctx: int

    def tokenize(self, text: str) -> list[int]: ...

    def generate(self, tokens: list[int], request: ChatRequest) -> Iterator[int]: ...

    def is_eog(self, token: int) -> bool: ...

    def token_bytes(self, token: int, previous: list[int]) -> bytes: ...


class LlamaEngine:
    """A GGUF model in llama.cpp (through llama-cpp-python)."""

    def __init__(self, model_path: Path, *, n_ctx: int, threads: int, bos_token: str) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(model_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        self.n_ctx = int(self.llm.n_ctx())
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._bos = bos_token

    def tokenize(self, text: str) -> list[int]:
        starts_with_bos = bool(self._bos) and text.startswith(self._bos)
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=not starts_with_bos, special=True))

    def generate(self, tokens: list[int], request: ChatRequest) -> Iterator[int]:
        self.llm.set_seed(request.seed if request.seed is not None else int.from_bytes(os.urandom(4), "little"))
        for token in self.llm.generate(
            tokens,
            top_k=request.top_k,
            top_p=request.top_p,
            min_p=request.min_p,
            temp=request.temperature,
            repeat_penalty=request.repeat_penalty,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            reset=True,
        ):
            yield int(token)

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def token_bytes(self, token: int, previous: list[int]) -> bytes:
        return bytes(self.llm.detokenize([token], prev_tokens=previous))


@dataclass
class Event:
    """A piece of the answer; the last one has ``finish_reason`` and the token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class EdgeApp:
    """One served model: names it answers to, its template and engine, and a lock so one request decodes at a time."""

    def __init__(self, name: str, template: ChatTemplate, engine: Engine, *, api_key: str | None = None) -> None:
        self.name = name
        repository, tag = name.rsplit(":", 1) if ":" in name.rsplit("/", 1)[-1] else (name, "latest")
        self.aliases = {name, f"{repository}:{tag}"} | ({repository} if tag == "latest" else set())
        self.template = template
        self.engine = engine
        self.api_key = api_key
        self.created = int(time.time())
        self.lock = threading.Lock()

    def model_object(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "llmos"}

    def check_model(self, requested: str) -> None:
        if requested not in self.aliases:
            message = f"model {requested!r} not found; this runner serves {self.name!r}"
            raise RequestError(message, status=404, param="model", code="model_not_found")

    def prepare(self, request: ChatRequest) -> tuple[list[int], int]:
        """Prompt tokens and the completion limit; a prompt that does not fit the context is a 400."""
        tokens = self.engine.tokenize(self.template.render(request.messages))
        n_ctx = self.engine.n_ctx
        if len(tokens) >= n_ctx:
            raise RequestError(
                f"this model's context is {n_ctx} tokens, but the prompt is {len(tokens)} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        if request.max_tokens is not None and len(tokens) + request.max_tokens > n_ctx:
            raise RequestError(
                f"this model's context is {n_ctx} tokens, but {len(tokens)} prompt tokens plus"
                f" max_tokens={request.max_tokens} ask for {len(tokens) + request.max_tokens}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return tokens, request.max_tokens if request.max_tokens is not None else n_ctx - len(tokens)

    def events(self, request: ChatRequest, tokens: list[int], limit: int) -> Iterator[Event]:
        """Generate (call with :attr:`lock` held); stops at an end-of-generation token, a stop string or the limit."""
        text = TextStream(request.stop)
        generated: list[int] = []
        reason = "length"
        for token in self.engine.generate(tokens, request):
            if self.engine.is_eog(token):
                reason = "stop"
                break
            piece = text.push(self.engine.token_bytes(token, tokens + generated))
            generated.append(token)
            if piece:
                yield Event(piece)
            if text.stopped:
                reason = "stop"
                break
            if len(generated) >= limit:
                break
        yield Event(text.finish(), reason, len(tokens), len(generated))


# --- HTTP -----------------------------------------------------------------------------------------------------------


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chunk(completion_id: str, created: int, model: str, delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": [choice]}  # fmt: skip


class EdgeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: EdgeApp, *, quiet: bool = False) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, EdgeHandler)
        self.app = app
        self.quiet = quiet


class EdgeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "llmos-edge/1"
    timeout = 300  # seconds a connection may sit idle or trickle its body before it is dropped
    server: EdgeServer

    # --- plumbing ---

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def _send_json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: RequestError) -> None:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        unread = self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers
        if unread and not self._body_read:  # its bytes would be taken for the next request: end the connection
            self.close_connection = True
        self._send_json(error.status, error.body(), headers)

    def _authorized(self) -> bool:
        key = self.server.app.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        self._body_read = False
        try:
            if path == "/health" and method == "GET":
                self._send_json(200, {"status": "ok", "model": self.server.app.name})
                return
            if not self._authorized():
                raise RequestError("a valid API key is required (Authorization: Bearer KEY)", status=401,
                                   code="invalid_api_key", type_="authentication_error")  # fmt: skip
            routes: dict[str, dict[str, Callable[[], None]]] = {
                "/v1/models": {"GET": self._models},
                "/v1/chat/completions": {"POST": self._chat},
            }
            if path.startswith("/v1/models/") and method == "GET":
                self._model(path[len("/v1/models/") :])
                return
            handlers = routes.get(path)
            if handlers is None:
                raise RequestError(f"no route {path}", status=404, code="not_found")
            if method not in handlers:
                raise RequestError(f"{method} is not allowed on {path}", status=405, code="method_not_allowed")
            handlers[method]()
        except RequestError as exc:
            self._send_error(exc)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as exc:  # never a traceback to the client; one line to the log
            sys.stderr.write(f"run_edge: internal error: {type(exc).__name__}: {exc}\n")
            self._send_error(RequestError("internal error", status=500, code="internal_error", type_="server_error"))

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # --- routes ---

    def _models(self) -> None:
        self._send_json(200, {"object": "list", "data": [self.server.app.model_object()]})

    def _model(self, model_id: str) -> None:
        from urllib.parse import unquote

        self.server.app.check_model(unquote(model_id))
        self._send_json(200, self.server.app.model_object())

    def _read_body(self) -> Any:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError("send the body with a Content-Length", status=411, code="length_required")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("send the body with a Content-Length", status=411, code="length_required")
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(f"the body is larger than {MAX_BODY_BYTES} bytes", status=413, code="request_too_large")
        raw = self.rfile.read(int(length))
        self._body_read = True
        try:
            return parse_json(raw)
        except ValueError as exc:  # UnicodeDecodeError is one
            raise RequestError(f"the body is not valid JSON: {exc}") from exc

    def _chat(self) -> None:
        app = self.server.app
        request = parse_chat_request(self._read_body())
        app.check_model(request.model)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        with app.lock:
            tokens, limit = app.prepare(request)
            events = app.events(request, tokens, limit)
            if request.stream:
                self._stream(events, completion_id, created, request.include_usage)
                return
            pieces: list[str] = []
            last = Event("")
            for event in events:
                pieces.append(event.text)
                last = event
        message = {"role": "assistant", "content": "".join(pieces), "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": last.finish_reason}
        usage = _usage(last.prompt_tokens, last.completion_tokens)
        body = {"id": completion_id, "object": "chat.completion", "created": created, "model": app.name,
                "system_fingerprint": None, "choices": [choice], "usage": usage}  # fmt: skip
        self._send_json(200, body)

    def _stream(self, events: Iterator[Event], completion_id: str, created: int, include_usage: bool) -> None:
        name = self.server.app.name
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(data: dict[str, Any] | str) -> None:
            payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
            frame = f"data: {payload}\n\n".encode()
            self.wfile.write(f"{len(frame):x}\r\n".encode() + frame + b"\r\n")
            self.wfile.flush()

        send(_chunk(completion_id, created, name, {"role": "assistant", "content": ""}, None))
        try:
            for event in events:
                if event.text:
                    send(_chunk(completion_id, created, name, {"content": event.text}, None))
                if event.finish_reason is not None:
                    send(_chunk(completion_id, created, name, {}, event.finish_reason))
                    if include_usage:
                        usage = _usage(event.prompt_tokens, event.completion_tokens)
                        send({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                              "model": name, "choices": [], "usage": usage})  # fmt: skip
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            raise
        except Exception as exc:  # the status line is gone: the error travels as an event, as llmos sends it
            sys.stderr.write(f"run_edge: generation failed: {type(exc).__name__}: {exc}\n")
            send(RequestError("generation failed", status=500, code="internal_error", type_="server_error").body())
        send("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


# --- command line ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run_edge.py",
        description="Serve this llmos edge bundle with an OpenAI-compatible chat API (needs only llama-cpp-python).",
    )
    parser.add_argument(
        "--bundle", type=Path, default=Path(__file__).resolve().parent, help="Bundle directory (default: this file's)."
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"Port to listen on (default {DEFAULT_PORT}).")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for llama.cpp (default: all cores).")
    parser.add_argument(
        "--ctx",
        type=int,
        default=DEFAULT_CTX,
        help=f"Context window in tokens (default {DEFAULT_CTX}; at most the model's).",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LLMOS_EDGE_API_KEY"),
        help="Require this bearer key on /v1 routes (default: $LLMOS_EDGE_API_KEY); needed to bind beyond loopback.",
    )
    parser.add_argument("--no-verify", action="store_true", help="Skip the sha256 check of the files at start.")
    parser.add_argument("--verify-only", action="store_true", help="Check the files against the manifest and exit.")
    parser.add_argument("--quiet", action="store_true", help="Do not log each request.")
    parser.add_argument(
        "--extra-buffers",
        choices=("auto", "on", "off"),
        default={"1": "on", "0": "off"}.get(os.environ.get("LLMOS_LLAMACPP_EXTRA_BUFFERS", "").strip(), "auto"),
        help=(
            "llama.cpp's fast CPU path (AMX, weight repacking): auto checks it once on this machine in a child"
            " process and falls back to the safe path where it crashes (default: auto, or"
            " $LLMOS_LLAMACPP_EXTRA_BUFFERS=1/0)."
        ),
    )
    parser.add_argument(
        "--probe-cache",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmos-edge",
        help="Where the fast-path check keeps its verdict (default: ~/.cache/llmos-edge).",
    )
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error("--port must be between 1 and 65535")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.ctx < 16:
        parser.error("--ctx must be at least 16")
    return args


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def context_size(requested: int, manifest: dict[str, Any]) -> int:
    """``--ctx``, but never more than the model was trained for (when the manifest knows that)."""
    trained = manifest["model"].get("context_length")
    if isinstance(trained, int) and not isinstance(trained, bool) and trained > 0:
        return min(requested, trained)
    return requested


def load_probe() -> Any:
    """The fast-path probe: the bundle's own ``llamacpp_probe.py``, else llmos's copy (when run from llmos)."""
    import importlib.util

    sibling = Path(__file__).resolve().with_name(PROBE_FILE)
    if sibling.is_file():
        spec = importlib.util.spec_from_file_location("llamacpp_probe", sibling)
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            sys.modules.setdefault("llamacpp_probe", module)  # dataclasses look their module up by name
            spec.loader.exec_module(module)
            return module
    from llmos.machine import llamacpp_probe

    return llamacpp_probe


def choose_cpu_path(mode: str, cache: Path) -> None:
    """Set llama.cpp up for this machine before it loads: the fast path where it works, else the safe one.

    ``auto`` runs the probe once per machine and llama.cpp build (the verdict is kept in ``cache``) and says in one
    line when it falls back; ``on`` / ``off`` decide without it. Raises ImportError without llama-cpp-python.
    """
    probe = load_probe()
    native = probe.installed_lib_dir()
    if native is None:
        raise ImportError("llama_cpp")
    if mode == "auto":
        verdict = probe.cached_probe(cache, native, [])
        if not verdict.extra_buffers:
            report(f"llama.cpp's fast CPU path is off on this machine: {verdict.reason} (--extra-buffers on forces it)")
    else:
        verdict = probe.Verdict(mode == "on", None, "installed", f"--extra-buffers {mode}", source="explicit")
    probe.apply(verdict)


def report(message: str) -> int:
    """One line on stderr (why the runner stops, or that it serves); returns 1, the exit code of a refusal."""
    sys.stderr.write(f"run_edge: {message}\n")
    sys.stderr.flush()
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root: Path = args.bundle.resolve()
    try:
        manifest = verify_bundle(root, hashes=not args.no_verify)
        template = ChatTemplate.load(root / manifest["model"]["chat_template"])
    except BundleError as exc:
        return report(f"refusing to start: the bundle in {root} does not match its manifest: {exc}")
    if args.verify_only:
        print(f"run_edge: all {len(manifest['files'])} files of {manifest['name']} match the manifest")
        return 0
    if not is_loopback(args.host) and not args.api_key:
        return report(f"refusing to listen on {args.host} without --api-key (or bind 127.0.0.1)")
    try:
        choose_cpu_path(args.extra_buffers, args.probe_cache)
        import llama_cpp  # noqa: F401 - fail early with the fix, not with a traceback
    except ImportError:
        return report("llama-cpp-python is not installed: pip install llama-cpp-python")
    model, threads = root / manifest["model"]["file"], args.threads or os.cpu_count() or 1
    try:
        engine = LlamaEngine(
            model, n_ctx=context_size(args.ctx, manifest), threads=threads, bos_token=template.bos_token
        )
    except (ValueError, RuntimeError, OSError) as exc:
        return report(f"llama.cpp could not load {manifest['model']['file']}: {exc}")
    app = EdgeApp(str(manifest["name"]), template, engine, api_key=args.api_key or None)
    try:
        server = EdgeServer((args.host.strip("[]"), args.port), app, quiet=args.quiet)
    except OSError as exc:
        return report(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    report(
        f"serving {app.name} on http://{args.host}:{args.port} (OpenAI API under /v1, context {engine.n_ctx} tokens)"
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
