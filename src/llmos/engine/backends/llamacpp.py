"""llama.cpp backend over the low-level C API of llama-cpp-python.

Contract: :class:`LlamaCppModel` implements :class:`llmos.engine.backends.base.Backend` over one ``llama_model``
and one ``llama_context``: tokenize / token bytes, end-of-generation tests, per-sequence sampler chains (optionally
grammar-constrained), logprobs, and :meth:`LlamaCppModel.decode` of a batch that mixes several sequences. The KV
cache is one unified pool of ``kv_pool_tokens`` cells (llama.cpp's unified KV cache) shared by the running
sequences (llama.cpp sequence ids ``0..n_seq_max-1``) and the prefix cache's holders (sequence ids from
``n_seq_max`` on): a cell tagged with several sequence ids is stored once, so saving, loading and splitting a
cached span only changes tags (``llama_memory_seq_cp`` / ``seq_rm``), never copies KV. Any one sequence may grow to
``n_ctx_seq`` tokens (the model's trained length at most) while the pool has room; the engine keeps the cells in use
within the pool. Not thread-safe: exactly one thread at a time may call into a
model (the engine gives each model one decode thread). Native resources are freed by :meth:`close`.

Build notes (see README, "llama.cpp build"): llmos installs llama-cpp-python compiled with ``GGML_OPENMP=OFF`` so
decode runs at full speed off the main thread, and native CPU flags. Whether llama.cpp's CPU extra buffer types
(weight repacking, AMX) are used, and from which build, is decided once per process by
:mod:`llmos.engine.backends.llamacpp_path` (a probe in a child process, cached per machine).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from llmos.config import Settings
from llmos.engine.backends import llamacpp_path
from llmos.engine.backends.base import BatchItem, TokenLogprob
from llmos.errors import BackendUnavailableError, DecodeError, InvalidInputError, KvPoolFullError, ModelLoadError
from llmos.types import SamplingParams

KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type ids of the KV cache element types llmos offers
MAX_SEQUENCE_IDS = 256  # llama.cpp's LLAMA_MAX_SEQ: running sequences plus prefix-cache holders
_init_lock = threading.Lock()
_lib: ModuleType | None = None
_silent_log: Any = None


def _make_silent_log(lib: ModuleType) -> Any:
    @lib.llama_log_callback  # type: ignore[untyped-decorator]
    def silent(_level: int, _text: bytes, _user_data: Any) -> None:
        return None

    return silent


def load_library(settings: Settings | None = None) -> ModuleType:
    """Import llama_cpp once, initialise its backend and route its logging through Python's (quiet by default).

    The first call decides the CPU path (:func:`llmos.engine.backends.llamacpp_path.choose`, with ``settings`` or
    the environment's) before the shared library is loaded.
    """
    global _lib
    with _init_lock:
        if _lib is None:
            if importlib.util.find_spec("llama_cpp") is not None:
                llamacpp_path.choose(settings)
            # read once by llmos's patched CPU flash attention (scripts/patches): "1" turns batch invariance on
            invariant = (settings or Settings()).batch_invariant
            os.environ["LLMOS_BATCH_INVARIANT"] = "1" if invariant else "0"
            try:
                import llama_cpp
                import llama_cpp._logger as llama_logger
            except ImportError as exc:  # pragma: no cover - depends on installation
                raise BackendUnavailableError(
                    "the llama.cpp backend is not installed; run `make install` (or pip install 'llmos[llamacpp]')"
                ) from exc
            llama_logger.logger.setLevel(logging.DEBUG if os.environ.get("LLMOS_LLAMACPP_VERBOSE") else logging.ERROR)
            if not os.environ.get("LLMOS_LLAMACPP_VERBOSE"):
                global _silent_log
                _silent_log = _make_silent_log(llama_cpp)  # keep a reference: C holds the pointer
                llama_cpp.llama_log_set(_silent_log, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _lib = llama_cpp
        return _lib


def system_info() -> str:
    """llama.cpp's description of the CPU features it was built with and uses."""
    lib = load_library()
    return bytes(lib.llama_print_system_info()).decode("utf-8", errors="replace").strip()


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
"""llama_token_data's layout, to fill candidate arrays through numpy."""


class Sampler:
    """A llama.cpp sampler chain for one sequence: grammar, bias, penalties, top-k/p, min-p, temperature, seed."""

    def __init__(
        self,
        model: LlamaCppModel,
        params: SamplingParams,
        grammar: str | None = None,
        grammar_trigger: str | None = None,
    ) -> None:
        lib = model.lib
        self._lib = lib
        self._model = model
        chain_params = lib.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self._chain = lib.llama_sampler_chain_init(chain_params)

        def add(sampler: Any) -> None:
            lib.llama_sampler_chain_add(self._chain, sampler)

        # The grammar is a filter outside the chain (see sample()). A lazy grammar (with a trigger) is armed here,
        # not by llama.cpp's lazy sampler: when the trigger appears, llama.cpp feeds the text from the trigger on to
        # the grammar unchecked, and text the grammar rejects (a model echoing "<tool_call> weather" from its
        # prompt) raises a C++ exception that no caller can catch and that ends the whole process.
        self._grammar: Any = None
        self._trigger = grammar_trigger.encode("utf-8") if grammar is not None and grammar_trigger else b""
        self._armed = grammar is not None and not self._trigger
        self._tail = b""  # the end of the output so far that could begin the trigger, while it is awaited
        if grammar is not None:
            grammar_sampler = lib.llama_sampler_init_grammar(model.vocab, grammar.encode("utf-8"), b"root")
            if not grammar_sampler:
                self.close()
                raise InvalidInputError("the response format could not be compiled into a grammar")
            self._grammar = grammar_sampler
        if params.logit_bias:
            biases = (lib.llama_logit_bias * len(params.logit_bias))()
            for i, (token, bias) in enumerate(params.logit_bias):
                if not 0 <= token < model.n_vocab:
                    raise InvalidInputError(
                        f"logit_bias token id {token} is outside the vocabulary", param="logit_bias"
                    )
                biases[i].token, biases[i].bias = token, bias
            add(lib.llama_sampler_init_logit_bias(model.n_vocab, len(params.logit_bias), biases))
        has_penalties = params.repeat_penalty != 1.0 or bool(params.frequency_penalty or params.presence_penalty)
        if has_penalties:
            add(
                lib.llama_sampler_init_penalties(
                    model.n_vocab,
                    params.penalty_last_n,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            )
        # plain greedy (no bias, no penalties) is an argmax of the logits row: numpy's, which picks the first of equal
        # maxima as llama.cpp's greedy sampler does, without copying the vocabulary into a candidate array
        self._argmax = params.greedy and not params.logit_bias and not has_penalties
        if params.greedy:
            add(lib.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(lib.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                add(lib.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                add(lib.llama_sampler_init_min_p(params.min_p, 1))
            add(lib.llama_sampler_init_temp(params.temperature))
            seed = lib.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
            add(lib.llama_sampler_init_dist(seed))

    def sample(self, output_row: int) -> int:
        """Pick the next token from the logits at ``output_row`` of the last decode (and record it).

        With a grammar, as llama.cpp's own samplers do: the unconstrained choice is checked against the grammar
        (one token) and only when it breaks the grammar is the whole vocabulary filtered by it and the choice made
        again. Checking every token of the vocabulary at every step cost about 20 ms a token here. No token the
        grammar rejects is ever accepted into it (llama.cpp aborts the process on one).
        """
        lib = self._lib
        if self._grammar is None:
            if self._argmax:
                return int(self._model.logits_row(output_row).argmax())
            return int(lib.llama_sampler_sample(self._chain, self._model.context, output_row))
        logits = self._model.logits_row(output_row)
        token = self._choose_awaiting(logits) if not self._armed else self._choose_armed(logits)
        lib.llama_sampler_accept(self._chain, token)
        return token

    def _choose_armed(self, logits: np.ndarray) -> int:
        token = self._choose(logits, constrained=False)
        if not self._allows(self._grammar, token):
            token = self._choose(logits, constrained=True)
            if not self._allows(self._grammar, token):  # nothing the grammar allows: end the output cleanly
                return self._end_token()
        self._lib.llama_sampler_accept(self._grammar, token)
        return token

    def _choose_awaiting(self, logits: np.ndarray) -> int:
        """Free choice while the trigger is awaited; a choice that completes the trigger arms the grammar with the
        text from the trigger on, and one whose text there breaks the grammar is banned and the choice made again."""
        banned: list[int] = []
        for _attempt in range(8):
            token = self._choose(logits, constrained=False, banned=banned)
            text = self._tail + self._model.token_bytes(token)
            at = text.find(self._trigger)
            if at < 0:
                self._tail = text[len(text) - len(self._trigger) + 1 :]
                return token
            if self._arm(text[at:]):
                return token
            banned.append(token)
        return self._end_token()

    def _arm(self, text: bytes) -> bool:
        """Feed ``text`` (the output from the trigger on) to the grammar, checking every piece first."""
        try:
            tokens = self._model.tokenize(text.decode("utf-8"), add_special=False, parse_special=False)
        except (UnicodeDecodeError, InvalidInputError):
            return False
        trial = self._lib.llama_sampler_clone(self._grammar)
        for token in tokens:
            if not self._allows(trial, token):
                self._lib.llama_sampler_free(trial)
                return False
            self._lib.llama_sampler_accept(trial, token)
        self._lib.llama_sampler_free(self._grammar)
        self._grammar, self._armed = trial, True
        return True

    def _allows(self, grammar: Any, token: int) -> bool:
        lib = self._lib
        single = (lib.llama_token_data * 1)()
        single[0].id, single[0].logit, single[0].p = token, 0.0, 0.0
        check = lib.llama_token_data_array(single, 1, -1, False)
        lib.llama_sampler_apply(grammar, ctypes.byref(check))
        return bool(np.isfinite(single[0].logit))

    def _end_token(self) -> int:
        end = int(self._lib.llama_vocab_eos(self._model.vocab))
        return end if end >= 0 else int(self._lib.llama_vocab_eot(self._model.vocab))

    def _choose(self, logits: np.ndarray, *, constrained: bool, banned: Sequence[int] = ()) -> int:
        lib, size = self._lib, len(logits)
        candidates = (lib.llama_token_data * size)()
        view = np.ctypeslib.as_array(candidates).view(_TOKEN_DATA)  # fill through numpy: 49k entries in ~0.1 ms
        view["id"] = np.arange(size, dtype=np.int32)
        view["logit"] = logits
        view["p"] = 0.0
        if banned:
            view["logit"][list(banned)] = -np.inf
        array = lib.llama_token_data_array(candidates, size, -1, False)
        if constrained:
            lib.llama_sampler_apply(self._grammar, ctypes.byref(array))
        lib.llama_sampler_apply(self._chain, ctypes.byref(array))
        return int(array.data[array.selected].id)

    def close(self) -> None:
        if self._chain is not None:
            self._lib.llama_sampler_free(self._chain)
            self._chain = None
        if getattr(self, "_grammar", None) is not None:
            self._lib.llama_sampler_free(self._grammar)
            self._grammar = None

    def __del__(self) -> None:  # pragma: no cover - safety net
        self.close()


class LlamaCppModel:
    """One GGUF model loaded into llama.cpp: ``n_seq_max`` running sequences of up to ``n_ctx_seq`` tokens each and
    ``prefix_holders`` cached spans in one KV pool of ``kv_pool_tokens`` cells."""

    backend_name = "llama.cpp"
    kv_shared_pool = True

    def __init__(
        self,
        path: Path,
        *,
        n_ctx_seq: int = 4096,
        n_batch: int = 512,
        n_seq_max: int = 1,
        threads: int = 2,
        extra_buffers: bool | None = None,
        kv_cache_type: str = "f16",
        kv_pool_tokens: int | None = None,
        prefix_holders: int = 128,
    ) -> None:
        lib = load_library()
        self.lib = lib
        self.path = path
        if extra_buffers is None:
            verdict = llamacpp_path.chosen()
            extra_buffers = verdict.extra_buffers if verdict is not None else False
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        model_params.use_extra_bufts = extra_buffers
        self._model = lib.llama_model_load_from_file(str(path).encode("utf-8"), model_params)
        if not self._model:
            raise ModelLoadError(f"llama.cpp could not load {path.name}")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(self._model))
        ctx_params = lib.llama_context_default_params()
        per_seq = min(n_ctx_seq, self.n_ctx_train) if self.n_ctx_train > 0 else n_ctx_seq
        pool = max(kv_pool_tokens if kv_pool_tokens is not None else per_seq * n_seq_max, 256)
        # An f32 cache runs attention without flash attention, and that path is only exact with one KV stream per
        # sequence (measured: a unified f32 cache changes a sequence's logits by up to 36 beside other sequences).
        # So f32 keeps the per-slot layout, without the prefix cache, for the runs that compare against PyTorch.
        unified = kv_cache_type != "f32"
        self.prefix_holders = max(0, min(prefix_holders, MAX_SEQUENCE_IDS - n_seq_max)) if unified else 0
        self.kv_shared_pool = unified
        ctx_params.n_ctx = pool if unified else per_seq * n_seq_max
        ctx_params.kv_unified = unified
        ctx_params.n_batch = n_batch
        ctx_params.n_ubatch = n_batch
        ctx_params.n_seq_max = n_seq_max + self.prefix_holders
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        ctx_params.no_perf = True
        ctx_params.type_k = ctx_params.type_v = KV_TYPES[kv_cache_type]
        if kv_cache_type == "f32":  # the CPU flash-attention kernel rounds through f16 even with an f32 cache
            ctx_params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = lib.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            lib.llama_model_free(self._model)
            self._model = None
            raise ModelLoadError(f"llama.cpp could not create a context for {path.name}")
        self._memory = lib.llama_get_memory(self._ctx)
        self.n_ctx = int(lib.llama_n_ctx(self._ctx))
        self.kv_pool_tokens = self.n_ctx
        self.n_ctx_seq = min(per_seq, self.n_ctx) if unified else int(lib.llama_n_ctx_seq(self._ctx))
        self.kv_cache_type = kv_cache_type
        self.n_batch = n_batch
        self.n_seq_max = n_seq_max
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self._vocab))
        self.bos_token = int(lib.llama_vocab_bos(self._vocab))
        self.eos_token = int(lib.llama_vocab_eos(self._vocab))
        self._batch = lib.llama_batch_init(max(n_batch, n_seq_max), 0, n_seq_max)
        self._pieces: dict[int, bytes] = {}

    # --- lifecycle --------------------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._ctx is None

    def close(self) -> None:
        if self._ctx is not None:
            self.lib.llama_batch_free(self._batch)
            self.lib.llama_free(self._ctx)
            self.lib.llama_model_free(self._model)
            self._ctx = None
            self._model = None

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def vocab(self) -> Any:
        return self._vocab

    @property
    def context(self) -> Any:
        if self._ctx is None:
            raise ModelLoadError("the model was closed")
        return self._ctx

    # --- vocabulary -------------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError("the text is not valid Unicode (it contains a lone surrogate)") from exc
        capacity = len(data) + 8
        buffer = (self.lib.llama_token * capacity)()
        count = self.lib.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_special, parse_special)
        if count < 0:
            capacity = -count
            buffer = (self.lib.llama_token * capacity)()
            count = self.lib.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_special, parse_special)
        if count < 0:
            raise InvalidInputError("the text could not be tokenized")
        return list(buffer[:count])

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for in generated text (special tokens render as empty)."""
        piece = self._pieces.get(token)
        if piece is None:
            buffer = ctypes.create_string_buffer(64)
            length = self.lib.llama_token_to_piece(self._vocab, token, buffer, 64, 0, False)
            if length < 0:
                buffer = ctypes.create_string_buffer(-length)
                length = self.lib.llama_token_to_piece(self._vocab, token, buffer, -length, 0, False)
            piece = buffer.raw[: max(length, 0)]
            self._pieces[token] = piece
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self._vocab, token))

    def new_sampler(
        self, params: SamplingParams, grammar: str | None = None, grammar_trigger: str | None = None
    ) -> Sampler:
        return Sampler(self, params, grammar, grammar_trigger)

    # --- compute ----------------------------------------------------------------------------------------------------

    def decode(self, items: Sequence[BatchItem]) -> dict[int, list[int]]:
        """Append each item's tokens to its sequence and run one forward pass.

        The total number of tokens must not exceed ``n_batch``. Returns, per ``seq_id`` that asked for logits, the
        rows to sample from (batch indices; one for ``"last"``, one per token for ``"all"``).
        """
        lib, batch = self.lib, self._batch
        total = sum(len(item.tokens) for item in items)
        if total == 0:
            return {}
        if total > self.n_batch:
            raise ValueError(f"batch of {total} tokens exceeds n_batch={self.n_batch}")
        rows: dict[int, list[int]] = {}
        index = 0
        # In ascending sequence order: llama.cpp's per-sequence KV streams are gathered far faster that way (16
        # sequences: ~95 ms a step ascending, ~200 ms descending, as the free-slot list hands them out after a burst).
        for item in sorted(items, key=lambda item: item.seq_id):
            last = len(item.tokens) - 1
            for offset, token in enumerate(item.tokens):
                batch.token[index] = token
                batch.pos[index] = item.start_pos + offset
                batch.n_seq_id[index] = 1
                batch.seq_id[index][0] = item.seq_id
                wants = item.logits == "all" or (item.logits == "last" and offset == last)
                batch.logits[index] = wants
                if wants:  # llama.cpp addresses logits by the token's index in the batch
                    rows.setdefault(item.seq_id, []).append(index)
                index += 1
        batch.n_tokens = total
        status = lib.llama_decode(self.context, batch)
        if status == 1:
            raise KvPoolFullError("llama_decode found no room in the KV pool for this step")
        if status != 0:
            raise DecodeError(f"llama_decode failed with status {status} (invalid batch)")
        return rows

    def logits_row(self, output_row: int) -> np.ndarray:
        """The logits at ``output_row`` of the last decode, as a view into llama.cpp's buffer (valid until the next
        decode)."""
        pointer = self.lib.llama_get_logits_ith(self.context, output_row)
        row = (ctypes.c_float * self.n_vocab).from_address(ctypes.addressof(pointer.contents))
        values: np.ndarray = np.frombuffer(row, dtype=np.float32)  # type: ignore[call-overload]
        return values

    def logprobs(self, output_row: int, token: int, top_n: int) -> tuple[float, list[TokenLogprob]]:
        logits = self.logits_row(output_row)
        shifted = logits - logits.max()
        log_z = float(np.log(np.exp(shifted, dtype=np.float64).sum()))
        chosen = float(shifted[token]) - log_z
        if top_n <= 0:
            return chosen, []
        best = np.argpartition(-shifted, top_n)[:top_n] if top_n < self.n_vocab else np.arange(self.n_vocab)
        best = best[np.argsort(-shifted[best])]
        return chosen, [TokenLogprob(int(t), float(shifted[t]) - log_z) for t in best]

    def bind_adapter(self, seq_id: int, adapter: str | None) -> None:
        if adapter is not None:
            raise InvalidInputError("LoRA adapters run on the PyTorch backend, not on llama.cpp", param="model")

    def forget_sequence(self, seq_id: int, from_pos: int = 0) -> None:
        """Drop a sequence's KV cache entries from ``from_pos`` on (all of them by default)."""
        self.lib.llama_memory_seq_rm(self._memory, seq_id, from_pos, -1)

    # --- prefix cache: holder h is llama.cpp sequence n_seq_max + h, sharing cells with the running ones -------------

    def _holder(self, holder: int) -> int:
        if not 0 <= holder < self.prefix_holders:
            raise ValueError(f"holder {holder} out of range")
        return self.n_seq_max + holder

    def save_span(self, holder: int, seq_id: int, start: int, end: int) -> None:
        self.lib.llama_memory_seq_cp(self._memory, seq_id, self._holder(holder), start, end)

    def load_span(self, holder: int, seq_id: int, start: int, end: int) -> None:
        self.lib.llama_memory_seq_cp(self._memory, self._holder(holder), seq_id, start, end)

    def split_span(self, holder: int, new_holder: int, at: int) -> None:
        source, target = self._holder(holder), self._holder(new_holder)
        self.lib.llama_memory_seq_cp(self._memory, source, target, at, -1)
        self.lib.llama_memory_seq_rm(self._memory, source, at, -1)

    def drop_span(self, holder: int) -> None:
        self.lib.llama_memory_seq_rm(self._memory, self._holder(holder), -1, -1)

    def drop_all_spans(self) -> None:
        for holder in range(self.prefix_holders):
            self.drop_span(holder)

    def clear(self) -> None:
        self.lib.llama_memory_clear(self._memory, True)
