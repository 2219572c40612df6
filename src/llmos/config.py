"""The one ``Settings`` object.

Contract: every tunable of llmos is a field here, with a description, a default and an environment variable
``LLMOS_<FIELD>``. CLI flags override fields by constructing ``Settings(**overrides)``; nothing else reads the
environment for configuration. ``Settings.describe()`` gives the effective values with secrets masked, which is
what ``llmos config`` prints.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_threads() -> int:
    """Threads for llama.cpp compute: the CPUs this process may use (llama.cpp scales poorly past physical cores)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


SWITCH_WORDS = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}


class Settings(BaseSettings):
    """Effective configuration of one llmos process."""

    model_config = SettingsConfigDict(env_prefix="LLMOS_", extra="forbid", validate_default=True)

    home: Path = Field(
        default=Path("~/.llmos"),
        description="Root of the local store: holds llmos.db (the registry) and blobs/ (content-addressed files).",
    )
    database_url: SecretStr | None = Field(
        default=None,
        description="SQLAlchemy URL of the registry database. Empty means SQLite at <home>/llmos.db.",
    )
    db_busy_timeout_ms: int = Field(
        default=30_000, ge=0, description="How long SQLite waits for a lock held by another process."
    )
    threads: int = Field(
        default_factory=_default_threads,
        ge=1,
        description="CPU threads llama.cpp uses for a forward pass (default: the CPUs this process may use).",
    )
    context_length: int = Field(
        default=8192,
        ge=64,
        description=(
            "Longest one sequence may be (prompt + completion), capped at the model's trained length. Sequences"
            " share the model's KV pool (kv_pool_tokens), so one long sequence can run beside many short ones."
        ),
    )
    kv_pool_tokens: int = Field(
        default=16384,
        ge=256,
        description=(
            "KV memory of one llama.cpp model, in tokens: shared by all its running sequences and its cached prompt"
            " prefixes. When it is full, cached prefixes are evicted (least recently used first), then the"
            " lowest-priority sequence is preempted and recomputed later."
        ),
    )
    kv_cache_type: Literal["f16", "f32", "q8_0"] = Field(
        default="f16",
        description=(
            "Precision of llama.cpp's KV cache: f16 (flash attention), q8_0 (half of f16's memory, flash attention)"
            " or f32 (without flash attention: float32 models then agree with PyTorch up to rounding)."
        ),
    )
    batch_invariant: bool = Field(
        default=True,
        description=(
            "llama.cpp computes each sequence's attention the same way whatever else shares its batch and wherever"
            " its cells sit in the KV pool, so greedy output does not depend on load, batching, the prefix cache or"
            " speculative decoding: the same request gives the same answer on a busy server as on an idle one"
            " (llmos's patched CPU flash attention, as vLLM's batch-invariant mode; measured on 2 cores: decode as"
            " fast as llama.cpp's own kernels, prefill of a 927-token prompt about 15% slower and of a 4,000-token"
            " one 35% slower). One setting per process: the first model load decides."
        ),
    )
    prefix_cache: bool = Field(
        default=True,
        description=(
            "Keep the KV of computed prompts (and finished answers) and reuse the longest cached prefix of a new"
            " request, so a conversation's next turn or a shared system prompt is not computed again."
        ),
    )
    prefix_cache_shared: bool = Field(
        default=False,
        description=(
            "With auth on, let tenants reuse each other's cached prefixes (off by default: a cache hit is a timing"
            " side channel that reveals whether another tenant sent a prompt)."
        ),
    )
    speculative: Literal["auto", "on", "off"] = Field(
        default="auto",
        description=(
            "Prompt-lookup speculative decoding: draft tokens by matching the text's last n-gram earlier in the"
            " sequence and verify them in one batched step; greedy output is unchanged. Used where it pays: few"
            " sequences decoding and drafts that keep being accepted. auto (the default): on for GGUF models whose"
            " weights have a batched kernel on this CPU (`llmos show` says which), off elsewhere (without one it"
            " measured 0.90x on chat; the PyTorch backend is not measured yet). Measured on 2 cores with llmos's"
            " batched Q4_1 kernel (`llmos bench --suite speculative`): 1.85x decode speed on copy-heavy answers and"
            " 1.08x on ordinary chat. on/off force it (1/0 and true/false also work). A request may turn it off"
            " (speculative=false)."
        ),
    )
    speculative_max_draft: int = Field(
        default=8, ge=1, le=32, description="Most draft tokens verified per step and sequence."
    )
    torch_context_length: int = Field(
        default=1024,
        ge=64,
        description="Context window of each sequence on the PyTorch backend (its KV cache is preallocated).",
    )
    torch_device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]{1,3})?)$",
        description=(
            "Where the PyTorch backend, fine-tuning and Ray training run: auto (the default: the first CUDA GPU when"
            " torch sees one, else the CPU), cpu, cuda or cuda:N. Ray training takes one GPU per worker when the"
            " cluster has enough (backend nccl), unless this is cpu."
        ),
    )
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description=(
            "Weights and KV cache dtype of the PyTorch backend: auto is float32 on the CPU and, on CUDA, bfloat16"
            " where the GPU has it natively (compute capability 8.0+), else float16. Fine-tuning has its own"
            " --precision (auto: bf16 on such GPUs, else fp32)."
        ),
    )
    batch_size: int = Field(
        default=512, ge=1, description="Most tokens (all sequences together) evaluated in one forward pass."
    )
    max_running: int = Field(
        default=16, ge=1, le=256, description="Sequences a served model decodes together (its KV slots)."
    )
    max_waiting: int = Field(
        default=64,
        ge=0,
        description="Requests that may queue per model when all slots are busy; beyond that, new ones get 503.",
    )
    max_prefill_tokens: int = Field(
        default=256,
        ge=1,
        description="Prompt tokens per step while other sequences are decoding (chunked prefill keeps them flowing).",
    )
    step_target_ms: int = Field(
        default=100,
        ge=0,
        description=(
            "While several requests share a model, keep each forward pass near this long by chunking prompts"
            " (learned from measured steps); bounds stalls of running streams and how long a new request waits."
            " 0 turns it off."
        ),
    )
    ray_address: str | None = Field(
        default=None,
        description=(
            "Serve models as replicas on this Ray cluster (host:port, or `auto` for the one `llmos cluster start`"
            " runs for this home). Unset: everything runs in this process."
        ),
    )
    ray_min_replicas: int = Field(default=1, ge=1, le=64, description="Replicas per model on Ray, at least.")
    ray_max_replicas: int = Field(
        default=1, ge=1, le=64, description="Replicas per model on Ray, at most (scaled up when requests queue)."
    )
    ray_scale_down_seconds: float = Field(
        default=60.0, gt=0, description="Idle time after which a Ray model above its minimum replicas drops one."
    )
    ray_scale_check_seconds: float = Field(
        default=2.0,
        gt=0,
        description="How often a Ray model's queue is checked; two checks in a row with requests queued add a replica.",
    )
    ray_replica_cpus: int = Field(
        default=1, ge=1, le=256, description="CPUs a Ray replica reserves (and compute threads it runs)."
    )
    ray_allow_remote: bool = Field(
        default=False, description="Allow a Ray address that is not on this machine (loopback only otherwise)."
    )
    memory_budget: str = Field(
        default="60%",
        description=(
            "Memory resident models may use together: bytes (8GB, 512MiB) or a share of RAM (60%). Idle models are"
            " evicted least-recently-used first to make room."
        ),
    )
    keep_alive: str = Field(
        default="5m",
        description="How long an idle model stays loaded (Ollama semantics: 5m, 1h, 0 = unload at once, -1 = forever).",
    )
    memory_wait_seconds: float = Field(
        default=30.0,
        ge=0.0,
        description="How long a request waits for busy models to free memory before it gets 503.",
    )
    auth: bool = Field(
        default=False,
        description="Require API keys even before any exists (authentication is on as soon as one key exists).",
    )
    train_job_slots: int = Field(
        default=1, ge=1, le=64, description="Training jobs that may run at the same time (others wait in the queue)."
    )
    job_dispatch_seconds: float = Field(
        default=5.0, gt=0, description="How often `llmos serve` starts queued jobs and detects dead job workers."
    )
    job_lease_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A running job whose worker has not refreshed its heartbeat for this long is taken over by"
        " another front end of the same database (its worker runs on another machine).",
    )
    usage_records: bool = Field(
        default=True,
        description="Record one usage row per request (tenant, key prefix, model, tokens, latency, status).",
    )
    responses_retention_hours: float = Field(
        default=720.0,
        gt=0,
        description=(
            "How long answers of /v1/responses stored with `store: true` are kept for previous_response_id and"
            " GET /v1/responses/{id} (OpenAI keeps them 30 days)."
        ),
    )
    encryption_key: SecretStr | None = Field(
        default=None,
        description=(
            "Encrypts adapters and fine-tuned weights at rest (AES-256-GCM): 32 bytes in base64/hex or a passphrase."
        ),
    )
    encryption_key_file: Path | None = Field(default=None, description="File holding the encryption key instead.")
    host: str = Field(default="127.0.0.1", description="Address `llmos serve` binds to.")
    port: int = Field(default=8470, ge=1, le=65535, description="Port `llmos serve` listens on.")
    advertise_url: str | None = Field(
        default=None,
        description="The URL other front ends of the same database reach this server at, to fetch blobs it holds"
        " (default: http://HOST:PORT).",
    )
    max_request_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Largest HTTP request body accepted (larger gets 413)."
    )
    max_header_bytes: int = Field(
        default=16 * 1024,
        ge=1024,
        description=(
            "Largest request head (request line and headers), counted as the bytes arrive: larger gets 431 and the"
            " connection is closed without reading the rest."
        ),
    )
    request_head_seconds: float = Field(
        default=10.0,
        gt=0,
        description=(
            "Deadline for a client to send a request's line and headers, from connecting (or from the request's first"
            " byte on a kept-alive connection): slower gets 408 and the connection is closed."
        ),
    )
    model_processes: bool = Field(
        default=True,
        description=(
            "`llmos serve` runs each loaded model (each replica) in a process of its own, forked from a per-backend"
            " zygote, so that a crash in native code takes down that model only. Off: models run inside the server"
            " process (the SDK always does)."
        ),
    )
    model_process_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description=(
            "A model process that sends nothing (not even its once-a-second heartbeat) for this long is killed and"
            " treated as crashed."
        ),
    )
    shutdown_grace_seconds: float = Field(
        default=30.0,
        gt=0,
        description=(
            "On SIGTERM / Ctrl-C, how long `llmos serve` lets requests in flight finish before it cancels them and"
            " exits."
        ),
    )
    request_read_seconds: float = Field(
        default=30.0,
        gt=0,
        description=(
            "Deadline for a client to send its whole request body (slower gets 408); the connection is closed a"
            " second later even where the handler does not read the body."
        ),
    )
    max_connections: int = Field(
        default=2048,
        ge=1,
        description=(
            "Open HTTP connections `llmos serve` holds at once; one more gets 503 and is closed. Lowered at start to"
            " fit the open-file limit (RLIMIT_NOFILE, raised toward its hard limit first), keeping 256 for the server."
        ),
    )
    max_connections_per_client: int = Field(
        default=512,
        ge=1,
        description=(
            "Open HTTP connections from one client address; one more gets 503 and is closed. Behind a reverse proxy"
            " every client has the proxy's address: set it to max_connections there."
        ),
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed to call the API from a browser (CORS); none by default."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Least severe log level `llmos serve` writes (the access log is at info)."
    )
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto",
        description="Log lines of `llmos serve` on stderr: JSON objects, readable text, or auto (text on a terminal).",
    )
    ready_min_free_bytes: int = Field(
        default=1024**3,
        ge=0,
        description="/ready answers 503 while the disk holding LLMOS_HOME has less free space than this (bytes).",
    )
    remote_api_key: SecretStr | None = Field(
        default=None,
        description="API key `llmos push` / `llmos pull --from` present to the other llmos server (or --api-key).",
    )
    transfer_allow_private: bool = Field(
        default=False,
        description=(
            "Let `llmos push` / `llmos pull --from` reach loopback, private, link-local and other non-public"
            " addresses (off: such targets are refused before any connection, so transfers cannot be used for SSRF)."
        ),
    )
    llamacpp_extra_buffers: bool | None = Field(
        default=None,
        description=(
            "Let llama.cpp use its CPU 'extra buffer types' (weight repacking, AMX on Intel): faster, and where a CPU"
            " advertises features it cannot run, a crash. Unset: a child process checks the fast path once per"
            " machine and llama.cpp build (see `llmos doctor`); 1 or 0 decides without that check."
        ),
    )
    llamacpp_variants_dir: Path | None = Field(
        default=None,
        description=(
            "Directory of alternative llama.cpp builds (one subdirectory of shared libraries each, e.g. `no-amx`)"
            " the probe tries when the installed build's fast path fails. Default: <python prefix>/lib/llmos-llama-cpp."
        ),
    )
    probe_cache_dir: Path | None = Field(
        default=None,
        description="Where the llama.cpp fast-path verdicts are kept (default: <home>/probes).",
    )
    probe_timeout_seconds: float = Field(
        default=60.0, gt=0, description="A fast-path probe child that runs longer than this counts as hung."
    )

    @field_validator("speculative", mode="before")
    @classmethod
    def _speculative(cls, value: Any) -> Any:
        """Booleans and their usual spellings (LLMOS_SPECULATIVE=1) mean on/off."""
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str) and value.strip().lower() in SWITCH_WORDS:
            return SWITCH_WORDS[value.strip().lower()]
        return value

    @field_validator("torch_device", "torch_dtype", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @property
    def db_path(self) -> Path:
        return self.home / "llmos.db"

    @property
    def blobs_dir(self) -> Path:
        return self.home / "blobs"

    def effective_database_url(self) -> str:
        if self.database_url is not None and self.database_url.get_secret_value():
            return self.database_url.get_secret_value()
        return f"sqlite:///{self.db_path}"

    def describe(self) -> list[dict[str, Any]]:
        """Every field with its effective value (secrets masked), env var name and description."""
        rows: list[dict[str, Any]] = []
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "********" if value.get_secret_value() else None
            elif isinstance(value, Path):
                value = str(value)
            rows.append(
                {
                    "name": name,
                    "value": value,
                    "env": f"LLMOS_{name.upper()}",
                    "description": field.description or "",
                }
            )
        return rows
