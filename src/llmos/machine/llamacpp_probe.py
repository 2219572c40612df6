#!/usr/bin/env python3
"""Does llama.cpp's fast CPU path work on this machine? Ask a child process, once, and remember the answer.

llama.cpp's CPU backend has *extra buffer types*: AMX tiles on recent Intel CPUs and weight repacking (the AVX2 /
AVX-512 GEMM kernels for Q4_0, Q8_0, IQ4_NL and K-quants). Batched decoding gets its speed there, and there too a
CPU that advertises a feature it cannot run (AMX under some hypervisors) faults: the process dies by SIGILL or
SIGSEGV, and no Python code can catch that. So before llama.cpp is used, a child process decodes a few tiny
synthetic models (one per quantization type the fast kernels handle: Q4_0, Q4_1, Q8_0, Q4_K/Q6_K, IQ4_NL) through
the *safe* path (no extra buffer types), then feeds the same tokens through the *fast* path and compares.

Contract:

* :func:`probe` never raises and never crashes its caller: whatever the child does (dies by a signal, hangs past
  ``timeout``, prints garbage, gives other logits), the answer is a :class:`Verdict`.
* The verdict picks, in this order: the fast path of the installed build; the fast path of a *variant* build (a
  directory of llama.cpp shared libraries, for example one compiled without AMX, which keeps weight repacking);
  the safe path of the installed build. ``Verdict.reason`` says why in one line.
* "Works" means: the child completes, and at every step, fed the safe path's greedy tokens, the fast path's logits
  are within :data:`LOGIT_TOLERANCE` standard deviations of the safe path's, so it picks the same greedy tokens
  except where the safe path's top two candidates are closer than that (a near-tie).
* :func:`cached_probe` keys the verdict by :func:`machine_key` (CPU model and flags, kernel, the bytes of every
  llama.cpp library in play, this probe's version) and keeps it as JSON in a cache directory; one process probes
  while others wait on a file lock, and later calls only read the file.
* :func:`apply` makes the current process use a verdict: ``LLAMA_CPP_LIB_PATH`` before ``llama_cpp`` is imported,
  and ``use_extra_bufts`` off in llama-cpp-python's default model parameters when the safe path was chosen.
* Standalone: the standard library only (numpy and llama_cpp in the child, both dependencies of llama-cpp-python),
  so ``llmos export --target edge`` ships this file beside the bundle's runner, which has no llmos.

Test hook: ``LLMOS_TEST_PROBE_FAULT=SIGNAL`` (for example ``SIGILL``) makes the child kill itself with that signal
just before its first fast-path decode, as a faulting AMX kernel would; ``SIGNAL@NAME`` does so only for the build
whose directory is named ``NAME`` (``lib`` is the installed build). ``hang`` instead of a signal makes it sleep,
``garble`` makes its logits wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROBE_VERSION = 1
DEFAULT_TIMEOUT = 60.0
FAULT_HOOK = "LLMOS_TEST_PROBE_FAULT"
LIB_PATH_VARIABLE = "LLAMA_CPP_LIB_PATH"  # llama-cpp-python loads its shared libraries from here when set

# The synthetic model: llama architecture, dimensions that every fast kernel accepts (rows of 256 for K-quants and
# AMX tiles, row counts a multiple of 8 for the repacked layouts).
N_EMBD, N_FF, N_LAYER, N_HEAD, N_HEAD_KV, N_VOCAB, N_CTX = 256, 512, 2, 4, 2, 512, 256
# llama_ftype values (llama.h) of the quantizations whose fast kernels we exercise
FTYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k_m": 15, "iq4_nl": 25}
PROMPTS = ([(7 * i + 3) % N_VOCAB for i in range(32)], [(11 * i + 5) % N_VOCAB for i in range(20)])
STEPS = 8
# The fast kernels quantize activations in their own layouts: on random weights their logits differ from the safe
# path's by up to ~0.06 standard deviations (measured on AMD EPYC / AVX-512). A faulty kernel is off by far more.
LOGIT_TOLERANCE = 0.3


@dataclass
class Verdict:
    """Which llama.cpp path to run: ``extra_buffers`` on a build (``lib_dir``; ``None`` = the installed one)."""

    extra_buffers: bool
    lib_dir: str | None
    build: str
    reason: str
    key: str = ""
    source: str = "probe"  # probe | cache | explicit
    seconds: float = 0.0
    probed_at: float = 0.0
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def fast(self) -> bool:
        return self.extra_buffers

    @property
    def describe(self) -> str:
        """A short name of the path: ``fast``, ``fast (no-amx build)`` or ``safe``."""
        if not self.extra_buffers:
            return "safe (extra buffer types off)"
        return "fast" if self.lib_dir is None else f"fast ({self.build} build)"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Verdict:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


# --- the key -------------------------------------------------------------------------------------------------------


def cpu_description() -> tuple[str, str]:
    """(CPU model name, feature flags) as /proc/cpuinfo states them (the machine name and '' elsewhere)."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif name in ("flags", "Features") and not flags:
                    flags = value.strip()
                if flags and model:
                    break
    except OSError:
        pass
    return model, flags


def library_files(lib_dir: Path) -> list[Path]:
    """The real (non-symlink) shared libraries of a llama.cpp build directory, sorted by name."""
    try:
        entries = sorted(lib_dir.iterdir())
    except OSError:
        return []
    return [p for p in entries if p.is_file() and not p.is_symlink() and (".so" in p.name or p.suffix == ".dylib")]


def machine_key(lib_dirs: Sequence[Path]) -> str:
    """A digest of everything the verdict depends on: CPU, kernel, every library's bytes, the probe's version."""
    digest = hashlib.sha256()
    model, flags = cpu_description()
    digest.update(f"{PROBE_VERSION}\n{model}\n{flags}\n{platform.machine()}\n{platform.release()}\n".encode())
    for lib_dir in lib_dirs:
        digest.update(f"dir {lib_dir.name}\n".encode())
        for path in library_files(lib_dir):
            digest.update(f"{path.name} {path.stat().st_size}\n".encode())
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:24]


def installed_lib_dir() -> Path | None:
    """The shared-library directory of the installed llama-cpp-python, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return path if path.is_dir() else None


def variant_dirs(root: Path | None) -> list[Path]:
    """Variant builds under ``root``: each subdirectory that holds a libllama shared library."""
    if root is None or not root.is_dir():
        return []
    return [d for d in sorted(root.iterdir()) if d.is_dir() and any(d.glob("libllama.*"))]


# --- the parent side -----------------------------------------------------------------------------------------------


@dataclass
class ChildOutcome:
    """What one probe child did: its results per (mode, model), and how it ended."""

    lib: str
    results: dict[tuple[str, str], dict[str, Any]]
    returncode: int | None
    failure: str | None  # None when the child exited 0 having printed every result

    def summary(self) -> dict[str, Any]:
        return {"lib": self.lib, "returncode": self.returncode, "failure": self.failure, "results": len(self.results)}


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def run_child(lib_dir: Path | None, modes: Sequence[str], workdir: Path, *, timeout: float, build: str) -> ChildOutcome:
    """Run the probe child against ``lib_dir`` and collect its JSON lines; never raises."""
    env = dict(os.environ)
    env.pop(LIB_PATH_VARIABLE, None)
    if lib_dir is not None:
        env[LIB_PATH_VARIABLE] = str(lib_dir)
    env["LLMOS_PROBE_BUILD"] = build
    boot = "import runpy, sys; path = sys.argv[1]; sys.argv = sys.argv[1:]; runpy.run_path(path, run_name='__main__')"
    command = [sys.executable, "-c", boot, str(Path(__file__).resolve()), "--child", ",".join(modes), str(workdir)]
    label = build
    try:
        proc = subprocess.run(
            command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return ChildOutcome(label, _parse(stdout), None, f"hung (no answer within {timeout:.0f} s)")
    except OSError as exc:
        return ChildOutcome(label, {}, None, f"could not start: {exc}")
    results = _parse(proc.stdout)
    if proc.returncode < 0:
        failure: str | None = f"died by {_signal_name(proc.returncode)}"
    elif proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1][:200]
        failure = f"exited with status {proc.returncode} ({last})"
    else:
        failure = None
    return ChildOutcome(label, results, proc.returncode, failure)


def _parse(stdout: str) -> dict[tuple[str, str], dict[str, Any]]:
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for line in stdout.splitlines():
        try:
            item = json.loads(line)
            results[(str(item["mode"]), str(item["model"]))] = item
        except (ValueError, KeyError, TypeError):
            continue
    return results


def _judge(base: ChildOutcome, fast: ChildOutcome) -> str | None:
    """Why the fast-path results in ``fast`` fail against the safe path's (both from ``base``), or None."""
    models = [name for mode, name in base.results if mode == "safe"]
    for name in models:
        result = fast.results.get(("fast", name))
        if result is None:
            return f"the {fast.lib} build's fast path {fast.failure or 'gave no result'} on a {name} model"
        try:
            error, flips, flip_margin = float(result["error"]), int(result["flips"]), float(result["flip_margin"])
        except (KeyError, TypeError, ValueError):
            return f"the {fast.lib} build's fast path gave a malformed result on a {name} model"
        if not error <= LOGIT_TOLERANCE:  # also NaN
            return (
                f"the {fast.lib} build's fast path differs from the safe path on a {name} model (logits off by"
                f" {error:.2f} standard deviations, {flips} greedy tokens differ)"
            )
        if flips and flip_margin > LOGIT_TOLERANCE:  # cannot happen within the tolerance; kept as a guard
            return f"the {fast.lib} build's fast path picks other greedy tokens than the safe path on a {name} model"
    if fast.failure:
        return f"the {fast.lib} build's fast path {fast.failure}"
    return None


def probe(native: Path | None, variants: Sequence[Path] = (), *, timeout: float = DEFAULT_TIMEOUT) -> Verdict:
    """Decide which llama.cpp path this machine runs (see the module docstring); never raises."""
    started = time.monotonic()
    checks: list[dict[str, Any]] = []

    def verdict(extra: bool, lib_dir: Path | None, build: str, reason: str) -> Verdict:
        return Verdict(
            extra_buffers=extra,
            lib_dir=str(lib_dir) if lib_dir is not None else None,
            build=build,
            reason=reason,
            seconds=round(time.monotonic() - started, 3),
            probed_at=time.time(),
            checks=checks,
        )

    with tempfile.TemporaryDirectory(prefix="llmos-probe-") as tmp:
        workdir = Path(tmp)
        base = run_child(native, ("safe", "fast"), workdir, timeout=timeout, build=native.name if native else "lib")
        base.lib = "installed"
        checks.append(base.summary())
        if sum(1 for mode, _ in base.results if mode == "safe") < len(FTYPES):
            cause = base.failure or "gave no result"
            return verdict(False, None, "installed", f"llama.cpp failed even on the safe path: {cause}")
        problem = _judge(base, base)
        if problem is None:
            return verdict(True, None, "installed", "the fast path agrees with the safe path")
        for variant in variants:
            outcome = run_child(variant, ("fast",), workdir, timeout=timeout, build=variant.name)
            outcome.lib = variant.name
            checks.append(outcome.summary())
            variant_problem = _judge(base, outcome)
            if variant_problem is None:
                return verdict(True, variant, variant.name, f"{problem}; the {variant.name} build's fast path works")
            problem = f"{problem}; {variant_problem}"
        return verdict(False, None, "installed", problem)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_cached(cache_dir: Path, key: str) -> Verdict | None:
    path = cache_dir / f"llamacpp-{key}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        cached = Verdict.from_json(data)
    except (OSError, ValueError, TypeError):
        return None
    if cached.key != key or (cached.lib_dir is not None and not Path(cached.lib_dir).is_dir()):
        return None
    cached.source = "cache"
    return cached


def cached_probe(
    cache_dir: Path,
    native: Path | None,
    variants: Sequence[Path] = (),
    *,
    timeout: float = DEFAULT_TIMEOUT,
    on_probe: Callable[[], None] | None = None,
) -> Verdict:
    """The verdict for this machine from ``cache_dir``, probing (once, under a lock) when there is none."""
    key = machine_key([d for d in (native, *variants) if d is not None])
    found = read_cached(cache_dir, key)
    if found is not None:
        return found
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock: contextlib.AbstractContextManager[None] = _locked(cache_dir / "llamacpp.lock")
    except OSError:
        lock = contextlib.nullcontext()
    with lock:
        found = read_cached(cache_dir, key)
        if found is not None:
            return found
        if on_probe is not None:
            on_probe()
        result = probe(native, variants, timeout=timeout)
        result.key = key
        write_cached(cache_dir, result)
    return result


def write_cached(cache_dir: Path, verdict: Verdict) -> None:
    """Keep ``verdict`` as this machine's (``verdict.key``) answer; best effort, atomic."""
    with contextlib.suppress(OSError):
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".llamacpp-{verdict.key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(verdict.to_json(), indent=1), encoding="utf-8")
        os.replace(tmp, cache_dir / f"llamacpp-{verdict.key}.json")


def apply(verdict: Verdict) -> None:
    """Make this process's llama-cpp-python follow ``verdict`` (library directory, extra buffer types).

    The library directory only takes effect if ``llama_cpp`` has not been imported yet, and never overrides a
    ``LLAMA_CPP_LIB_PATH`` the user set. Patches ``llama_model_default_params`` so that every model loaded through
    llama-cpp-python's own classes (``llama_cpp.Llama``, its server) gets ``use_extra_bufts`` from the verdict.
    """
    if verdict.lib_dir is not None and "llama_cpp" not in sys.modules:
        os.environ.setdefault(LIB_PATH_VARIABLE, verdict.lib_dir)
    import llama_cpp.llama_cpp as native

    current = native.llama_model_default_params
    original = getattr(current, "_llmos_original", current)  # applied twice: wrap the library's function once

    def default_params() -> Any:
        params = original()
        params.use_extra_bufts = verdict.extra_buffers
        return params

    default_params._llmos_original = original  # type: ignore[attr-defined]
    native.llama_model_default_params = default_params
    with contextlib.suppress(ImportError, AttributeError):
        import llama_cpp

        llama_cpp.llama_model_default_params = default_params


# --- the child side ------------------------------------------------------------------------------------------------


def _gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def write_probe_model(path: Path, seed: int = 0) -> None:
    """A small random llama-architecture GGUF in float32 (no vocabulary: token ids are decoded directly)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    head_dim = N_EMBD // N_HEAD
    kv = head_dim * N_HEAD_KV
    shapes: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (N_VOCAB, N_EMBD))]
    for layer in range(N_LAYER):
        prefix = f"blk.{layer}."
        shapes += [
            (prefix + "attn_norm.weight", (N_EMBD,)),
            (prefix + "attn_q.weight", (N_EMBD, N_EMBD)),
            (prefix + "attn_k.weight", (kv, N_EMBD)),
            (prefix + "attn_v.weight", (kv, N_EMBD)),
            (prefix + "attn_output.weight", (N_EMBD, N_EMBD)),
            (prefix + "ffn_norm.weight", (N_EMBD,)),
            (prefix + "ffn_gate.weight", (N_FF, N_EMBD)),
            (prefix + "ffn_up.weight", (N_FF, N_EMBD)),
            (prefix + "ffn_down.weight", (N_EMBD, N_FF)),
        ]
    shapes += [("output_norm.weight", (N_EMBD,)), ("output.weight", (N_VOCAB, N_EMBD))]
    metadata: list[tuple[str, int, bytes]] = [
        ("general.architecture", 8, _gguf_string("llama")),
        ("general.name", 8, _gguf_string("llmos-probe")),
        ("general.file_type", 4, struct.pack("<I", 0)),
        ("llama.context_length", 4, struct.pack("<I", N_CTX)),
        ("llama.embedding_length", 4, struct.pack("<I", N_EMBD)),
        ("llama.block_count", 4, struct.pack("<I", N_LAYER)),
        ("llama.feed_forward_length", 4, struct.pack("<I", N_FF)),
        ("llama.attention.head_count", 4, struct.pack("<I", N_HEAD)),
        ("llama.attention.head_count_kv", 4, struct.pack("<I", N_HEAD_KV)),
        ("llama.attention.layer_norm_rms_epsilon", 6, struct.pack("<f", 1e-5)),
        ("llama.rope.dimension_count", 4, struct.pack("<I", head_dim)),
        ("llama.vocab_size", 4, struct.pack("<I", N_VOCAB)),
        ("tokenizer.ggml.model", 8, _gguf_string("no_vocab")),
    ]
    header = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(shapes), len(metadata)))
    for key, kind, value in metadata:
        header += _gguf_string(key) + struct.pack("<I", kind) + value
    arrays = []
    offset = 0
    for name, shape in shapes:
        if len(shape) == 1:
            array = np.ones(shape, dtype=np.float32)
        else:
            scale = 3.0 if name == "output.weight" else 1.0
            array = (rng.standard_normal(shape) * (scale / np.sqrt(shape[1]))).astype(np.float32)
        header += _gguf_string(name) + struct.pack("<I", len(shape))
        header += b"".join(struct.pack("<Q", dim) for dim in reversed(shape))  # GGUF lists the fastest dim first
        header += struct.pack("<IQ", 0, offset)
        arrays.append(array)
        offset += -(-array.nbytes // 32) * 32
    header += b"\0" * (-len(header) % 32)
    with open(path, "wb") as out:
        out.write(header)
        for array in arrays:
            out.write(array.tobytes())
            out.write(b"\0" * (-array.nbytes % 32))


def _quiet_logs(lib: Any) -> Any:
    @lib.llama_log_callback  # type: ignore[untyped-decorator]
    def errors_only(level: int, text: bytes, _user_data: Any) -> None:
        if level == 4:  # GGML_LOG_LEVEL_ERROR
            sys.stderr.write(text.decode("utf-8", errors="replace"))

    lib.llama_log_set(errors_only, None)
    return errors_only


def prepare_models(lib: Any, workdir: Path) -> dict[str, Path]:
    """The probe's models in ``workdir``: one float32 GGUF quantized once per type in :data:`FTYPES`."""
    source = workdir / "probe-f32.gguf"
    if not source.exists():
        write_probe_model(source)
    models = {}
    for name, ftype in FTYPES.items():
        target = workdir / f"probe-{name}.gguf"
        if not target.exists():
            params = lib.llama_model_quantize_default_params()
            params.ftype = ftype
            params.nthread = 2
            partial = workdir / f"probe-{name}.partial"
            if lib.llama_model_quantize(str(source).encode(), str(partial).encode(), params) != 0:
                raise RuntimeError(f"llama_model_quantize failed for {name}")
            os.replace(partial, target)
        models[name] = target
    return models


def _fault_requested(build: str) -> str | None:
    """The fault the test hook asks for in this build's fast path (a signal name or 'hang'), if any."""
    hook = os.environ.get(FAULT_HOOK, "").strip()
    if not hook:
        return None
    what, _, where = hook.partition("@")
    if where and where != build:
        return None
    return what


def decode_model(
    lib: Any, path: Path, *, extra_buffers: bool, threads: int, forced: Sequence[Sequence[int]] | None = None
) -> tuple[list[list[int]], Any]:
    """Prefill both prompts in one batch, then decode both for :data:`STEPS` steps.

    Returns the tokens fed after the prompts (the greedy choices, or ``forced`` when given) and the logits of every
    step, shaped (steps + 1, sequences, vocabulary).
    """
    import numpy as np

    model_params = lib.llama_model_default_params()
    model_params.n_gpu_layers = 0
    model_params.use_extra_bufts = extra_buffers
    model = lib.llama_model_load_from_file(str(path).encode(), model_params)
    if not model:
        raise RuntimeError(f"could not load {path.name}")
    ctx_params = lib.llama_context_default_params()
    ctx_params.n_ctx = N_CTX * len(PROMPTS)
    ctx_params.n_batch = ctx_params.n_ubatch = 64
    ctx_params.n_seq_max = len(PROMPTS)
    ctx_params.n_threads = ctx_params.n_threads_batch = threads
    ctx_params.no_perf = True
    ctx = lib.llama_init_from_model(model, ctx_params)
    if not ctx:
        lib.llama_model_free(model)
        raise RuntimeError(f"could not create a context for {path.name}")
    batch = lib.llama_batch_init(64, 0, len(PROMPTS))
    try:
        n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model)))
        logits = np.zeros((STEPS + 1, len(PROMPTS), n_vocab), dtype=np.float32)
        fed: list[list[int]] = [[] for _ in PROMPTS]
        feed = [(seq, list(prompt), 0) for seq, prompt in enumerate(PROMPTS)]
        for step in range(STEPS + 1):
            index, rows = 0, {}
            for seq, items, start in feed:
                for offset, token in enumerate(items):
                    batch.token[index], batch.pos[index] = token, start + offset
                    batch.n_seq_id[index], batch.seq_id[index][0] = 1, seq
                    batch.logits[index] = offset == len(items) - 1
                    if batch.logits[index]:
                        rows[seq] = index
                    index += 1
            batch.n_tokens = index
            if lib.llama_decode(ctx, batch) != 0:
                raise RuntimeError(f"llama_decode failed on {path.name}")
            next_feed = []
            for seq, items, start in feed:
                logits[step, seq] = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, rows[seq]), shape=(n_vocab,))
                token = int(forced[seq][step]) if forced is not None else int(np.argmax(logits[step, seq]))
                fed[seq].append(token)
                next_feed.append((seq, [token], start + len(items)))
            feed = next_feed
        return fed, logits
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        lib.llama_model_free(model)


def fast_report(safe_logits: Any, fast_logits: Any) -> dict[str, Any]:
    """How far the fast path's logits are from the safe path's, fed the same tokens (errors relative to spread)."""
    import numpy as np

    spread = np.maximum(safe_logits.std(axis=-1), 1e-6)
    error = float(np.max(np.abs(fast_logits - safe_logits).max(axis=-1) / spread))
    ranked = np.sort(safe_logits, axis=-1)
    margin = (ranked[..., -1] - ranked[..., -2]) / spread
    disagree = np.argwhere(np.argmax(fast_logits, axis=-1) != np.argmax(safe_logits, axis=-1))
    worst_tie = max((float(margin[step, seq]) for step, seq in disagree), default=0.0)
    return {"error": error if np.isfinite(error) else float("nan"), "flips": len(disagree), "flip_margin": worst_tie}


def child_main(argv: Sequence[str]) -> int:
    """``--child MODES WORKDIR``: run every probe model in each mode, one JSON line per (mode, model).

    ``safe`` decodes greedily and keeps its tokens and logits in ``WORKDIR``; ``fast`` feeds those same tokens
    through the fast path and reports how far its logits are from the safe ones (:func:`fast_report`).
    """
    import numpy as np

    modes, workdir = argv[0].split(","), Path(argv[1])
    import llama_cpp

    keep = _quiet_logs(llama_cpp)
    llama_cpp.llama_backend_init()
    build = os.environ.get("LLMOS_PROBE_BUILD", "lib")
    threads = max(1, min(4, os.cpu_count() or 1))
    models = prepare_models(llama_cpp, workdir)
    for mode in modes:
        fast = mode == "fast"
        fault = _fault_requested(build) if fast else None
        if fault == "hang":
            time.sleep(3600)
        elif fault and fault != "garble":
            sys.stdout.flush()
            os.kill(os.getpid(), getattr(signal, fault, signal.SIGILL))
        for name, path in models.items():
            saved = workdir / f"safe-{name}.npz"
            if fast:
                with np.load(saved) as safe:
                    safe_tokens, safe_logits = safe["tokens"].tolist(), safe["logits"]
                _, logits = decode_model(llama_cpp, path, extra_buffers=True, threads=threads, forced=safe_tokens)
                if fault == "garble":  # a kernel that computes wrong numbers
                    logits = logits + np.random.default_rng(1).standard_normal(logits.shape).astype(np.float32) * 3
                result = fast_report(safe_logits, logits)
            else:
                tokens, logits = decode_model(llama_cpp, path, extra_buffers=False, threads=threads)
                np.savez(workdir / f"safe-{name}.partial.npz", tokens=np.array(tokens), logits=logits)
                os.replace(workdir / f"safe-{name}.partial.npz", saved)
                result = {"tokens": tokens}
            print(json.dumps({"mode": mode, "model": name, **result}), flush=True)
    del keep
    return 0


def main(argv: Sequence[str]) -> int:
    """``python llamacpp_probe.py [--check] [VARIANT_DIR ...]``: probe now and print the verdict as JSON.

    ``--check`` prints only the reason and exits 0 when the installed build's fast path works, 3 when it does not
    (the Makefile builds the no-AMX variant then).
    """
    check = "--check" in argv
    variants = [Path(arg) for arg in argv if arg != "--check"]
    outcome = probe(installed_lib_dir(), variants)
    if check:
        state = "works" if outcome.extra_buffers else "fails"
        print(f"llama.cpp fast path: {state} ({outcome.reason})", file=sys.stderr)
        return 0 if outcome.extra_buffers and outcome.lib_dir is None else 3
    print(json.dumps(outcome.to_json(), indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
