"""Turning a registry version into a running instance on the right backend.

Contract: :meth:`Loader.backend_for` picks the backend from the version's format and task (GGUF -> llama.cpp, a
Hugging Face causal LM -> torch, a sentence-transformers directory -> sentence-transformers, ONNX -> onnx), unless an
override names another one for that model. :meth:`Loader.__call__` builds the instance: a
:class:`~llmos.runtime.model.LoadedModel` (backend + running engine) for generation, or an
:class:`~llmos.runtime.embedding.EmbeddingModel`. Multi-file versions are loaded from their materialised
directory. With a :class:`~llmos.runtime.launcher.Launcher` (``llmos serve``), each instance runs in a model
process of its own (:mod:`llmos.runtime.model_process`) and looks the same to its users. A combination that
cannot work (a GGUF on torch, an adapter as a model) is refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from llmos.config import Settings
from llmos.engine.backends import llamacpp_path
from llmos.engine.core import EngineConfig, EngineCore, StepStats
from llmos.errors import BackendUnavailableError, InvalidInputError
from llmos.machine.llamacpp_probe import Verdict
from llmos.registry.names import parse_ref
from llmos.registry.service import Registry, ResolvedModel
from llmos.registry.views import VersionView
from llmos.runtime import model_process
from llmos.runtime.failures import FailureLog
from llmos.runtime.launcher import Launcher, Spawned
from llmos.runtime.memory import estimate_bytes
from llmos.runtime.model import LoadedModel
from llmos.runtime.model_worker import LoadSpec

BACKENDS = ("llama.cpp", "torch", "sentence-transformers", "onnx")
PROCESS_LOAD_SECONDS = 600.0


def default_backend(view: VersionView) -> str:
    if view.format == "gguf":
        return "llama.cpp"
    if view.format == "onnx":
        return "onnx"
    if view.format == "lora":
        raise InvalidInputError(f"{view.name} is a LoRA adapter; it runs on its base model, not on its own")
    if view.details.get("task") == "embedding":
        return "sentence-transformers"
    return "torch"


def parse_replicas(items: Iterable[str]) -> dict[str, int]:
    """``NAME=N`` pairs (CLI ``--replicas``) -> {repository: N}."""
    counts: dict[str, int] = {}
    for item in items:
        name, sep, count = item.partition("=")
        if not sep or not count.isdigit() or not 1 <= int(count) <= 16:
            raise InvalidInputError(f"--replicas takes NAME=N with N between 1 and 16: {item!r}")
        counts[parse_ref(name).repository] = int(count)
    return counts


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """``NAME=BACKEND`` pairs (CLI ``--backend``) -> {repository: backend}."""
    overrides: dict[str, str] = {}
    for item in items:
        name, sep, backend = item.partition("=")
        if not sep or backend not in BACKENDS:
            raise InvalidInputError(f"--backend takes NAME=BACKEND with BACKEND one of {', '.join(BACKENDS)}: {item!r}")
        overrides[parse_ref(name).repository] = backend
    return overrides


def import_backend(backend: str, settings: Settings) -> None:
    """Import a backend's libraries into this process (for llama.cpp: settle the CPU path and load the library)."""
    if backend == "torch":
        import torch  # noqa: F401
        import transformers.models.llama.modeling_llama

        import llmos.engine.backends.torch
    elif backend == "sentence-transformers":
        import sentence_transformers  # noqa: F401
        import transformers.models.bert.modeling_bert  # noqa: F401
    elif backend == "llama.cpp":
        from llmos.engine.backends.llamacpp import load_library

        load_library(settings)
    elif backend == "onnx":
        import onnxruntime  # noqa: F401

        import llmos.engine.backends.onnx  # noqa: F401


class Loader:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        *,
        max_running: int | None = None,
        overrides: dict[str, str] | None = None,
        replicas: dict[str, int] | None = None,
        step_listener: Callable[[str, StepStats], None] | None = None,
        launcher: Launcher | None = None,
        failures: FailureLog | None = None,
    ) -> None:
        """``launcher``: run each instance in a model process of its own (the server); None: in this process.
        ``failures`` hears of model processes that died and of replicas restarted."""
        self.settings = settings
        self.registry = registry
        self.max_running = max_running or settings.max_running
        self.overrides = overrides or {}
        self.replicas = replicas or {}
        self.step_listener = step_listener
        self.launcher = launcher
        self.failures = failures
        self.safe_path_reason: str | None = None
        """Set once llama.cpp's fast path faulted in a model process: every later one runs the safe path."""

    def backend_for(self, view: VersionView) -> str:
        return self.overrides.get(view.repository) or default_backend(view)

    def prepare(self, backend: str) -> None:
        """Import the backend's libraries (a one-time cost shared by every model that uses them): into this process,
        or, with model processes, into the backend's zygote."""
        if self.launcher is not None:
            self.launcher.prepare(backend)
        else:
            import_backend(backend, self.settings)

    def llamacpp_verdict(self) -> Verdict | None:
        """The llama.cpp CPU path models run on (None before the first llama.cpp model)."""
        if self.launcher is None:
            return llamacpp_path.chosen()
        reported = self.launcher.llamacpp_verdict
        verdict = Verdict.from_json(reported) if reported else None
        if verdict is not None and self.safe_path_reason is not None:
            return Verdict(False, None, "installed", self.safe_path_reason, key=verdict.key, source="fault")
        return verdict

    def estimate(self, view: VersionView, backend: str) -> int:
        """Expected RSS growth of loading ``view`` on ``backend`` (all replicas), before any measurement."""
        one = estimate_bytes(
            backend=backend,
            file_size=view.size,
            parameter_count=view.parameter_count,
            details=view.details,
            kv_tokens=self.kv_tokens(backend),
            kv_cache_type=self.settings.kv_cache_type,
        )
        return one * self.replicas.get(view.repository, 1)

    def kv_tokens(self, backend: str) -> int:
        if backend == "llama.cpp":  # one pool: running sequences and cached prefixes together
            return self.settings.kv_pool_tokens
        if backend == "torch":  # per-slot caches plus the prefix cache's copies
            return self.settings.torch_context_length * self.max_running + self.torch_prefix_cache_tokens
        if backend == "onnx":  # the running sequences' caches, no prefix cache
            return self.settings.torch_context_length * self.max_running
        return 0

    @property
    def torch_prefix_cache_tokens(self) -> int:
        """The PyTorch backend keeps copies of cached prefixes (fp32) worth one sequence's context."""
        return self.settings.torch_context_length

    def __call__(self, resolved: ResolvedModel, backend: str) -> Any:
        count = self.replicas.get(resolved.view.repository, 1)
        if count > 1 and backend != "sentence-transformers" and resolved.view.details.get("task") != "embedding":
            from llmos.runtime.replicas import ReplicaSet

            failures = self.failures
            return ReplicaSet(
                resolved.view,
                lambda: self._load(resolved, backend),
                count,
                on_restart=failures.restarted if failures is not None else None,
            )
        return self._load(resolved, backend)

    def _load(self, resolved: ResolvedModel, backend: str) -> Any:
        if self.launcher is not None:
            return self._start_process(resolved, backend, self.launcher)
        with self.registry.loadable_dir(resolved) as directory:  # decrypted only for the duration of the load
            return self.load_from(resolved, backend, directory)

    def _spec(self, resolved: ResolvedModel, backend: str, directory: Path) -> LoadSpec:
        safe = self.safe_path_reason if backend == "llama.cpp" else None
        return LoadSpec(resolved, backend, directory, self.max_running, safe)

    def _start_process(self, resolved: ResolvedModel, backend: str, launcher: Launcher) -> Any:
        options = model_process.ProcessOptions(
            launcher,
            hang_seconds=self.settings.model_process_timeout_seconds,
            load_seconds=PROCESS_LOAD_SECONDS,
            on_step=self.step_listener,
            on_failure=self.failures.record if self.failures is not None else None,
        )

        def respawn(why: str) -> tuple[Spawned, dict[str, Any]]:
            """The same model again, on llama.cpp's safe path: recorded for every later process and llmos doctor."""
            self.safe_path_reason = why
            llamacpp_path.record_fault(self.settings, why)
            with self.registry.loadable_dir(resolved) as directory:
                return model_process.load(launcher, self._spec(resolved, backend, directory), resolved.view.name,
                                          PROCESS_LOAD_SECONDS)  # fmt: skip

        with self.registry.loadable_dir(resolved) as directory:  # decrypted only until the process has loaded it
            spec = self._spec(resolved, backend, directory)
            return model_process.start(options, spec, respawn if backend == "llama.cpp" else None)

    def _speculative(self, backend: str, view: VersionView) -> bool:
        """Settings.speculative for one model: ``auto`` is on where batched verification is cheap, i.e. for GGUF
        weights with a batched kernel on this CPU (without one, drafts cost more than they save: 0.90x on chat);
        the PyTorch backend has not been measured, so auto leaves it off."""
        if self.settings.speculative != "auto":
            return self.settings.speculative == "on"
        if backend != "llama.cpp":
            return False
        from llmos.compression.quantize import batched_kernel

        kernel = batched_kernel(view.quantization, view.format, view.name, self.settings)
        return kernel is not None and kernel.kernel != "none"

    def load_from(self, resolved: ResolvedModel, backend: str, directory: Path) -> Any:
        """Load ``resolved`` from ``directory`` (its files under their own names) without touching the registry."""
        view = resolved.view
        if backend == "onnx" and view.format != "onnx":
            raise BackendUnavailableError(
                f"{view.name} is a {view.format} model; the onnx backend runs ONNX graphs"
                " (`llmos convert NAME --to onnx` makes one)"
            )
        if backend == "sentence-transformers":
            from llmos.runtime.embedding import EmbeddingModel

            return EmbeddingModel(view, directory, threads=self.settings.threads)
        if backend == "onnx" and view.details.get("task") == "embedding":
            from llmos.runtime.onnx_embedding import OnnxEmbeddingModel

            return OnnxEmbeddingModel(view, directory, threads=self.settings.threads)
        if backend == "llama.cpp":
            if view.format != "gguf":
                raise BackendUnavailableError(
                    f"{view.name} is a {view.format} model; llama.cpp runs GGUF files (convert it with `llmos convert`)"
                )
            from llmos.engine.backends.llamacpp import LlamaCppModel, load_library

            load_library(self.settings)  # decides the CPU path (probe or cached verdict) before the first model
            generator: Any = LlamaCppModel(
                directory / next(iter(resolved.paths)),
                n_ctx_seq=self.settings.context_length,
                n_batch=self.settings.batch_size,
                n_seq_max=self.max_running,
                threads=self.settings.threads,
                kv_cache_type=self.settings.kv_cache_type,
                kv_pool_tokens=self.settings.kv_pool_tokens,
            )
        elif backend == "torch":
            if view.format != "hf":
                raise BackendUnavailableError(
                    f"{view.name} is a {view.format} model; the torch backend runs Hugging Face checkpoints"
                    " (`llmos convert NAME --to safetensors` makes one)"
                )
            from llmos.engine.backends.torch import TorchBackend

            generator = TorchBackend(
                directory,
                n_seq_max=self.max_running,
                n_ctx_seq=self.settings.torch_context_length,
                n_batch=self.settings.batch_size,
                threads=self.settings.threads,
                device=self.settings.torch_device,
                dtype=self.settings.torch_dtype,
                prefix_cache_tokens=self.torch_prefix_cache_tokens,
            )
        elif backend == "onnx":
            from llmos.engine.backends.onnx import OnnxBackend

            generator = OnnxBackend(
                directory,
                n_seq_max=self.max_running,
                n_ctx_seq=self.settings.torch_context_length,
                n_batch=self.settings.batch_size,
                threads=self.settings.threads,
            )
        else:
            raise BackendUnavailableError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        listener = self.step_listener
        engine = EngineCore(
            generator,
            EngineConfig(
                max_waiting=self.settings.max_waiting,
                max_prefill_tokens=self.settings.max_prefill_tokens,
                step_target_seconds=self.settings.step_target_ms / 1000,
                prefix_cache=self.settings.prefix_cache,
                speculative=self._speculative(backend, view),
                speculative_max_draft=self.settings.speculative_max_draft,
            ),
            name=view.name,
            step_listener=(lambda stats: listener(view.name, stats)) if listener else None,
        )
        return LoadedModel(view, generator, engine)
