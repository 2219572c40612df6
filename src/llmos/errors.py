"""Every exception llmos raises on purpose.

Contract: code in llmos raises subclasses of :class:`LlmosError` for anything a user can cause or fix. Each class
carries a stable machine-readable ``code``, an OpenAI-style error ``type`` and the HTTP ``status`` it maps to. The
HTTP layer and the CLI translate these in exactly one place each; everything else just raises. Messages are written
for the person who typed the command: they say what is wrong and, where possible, what to do instead. They never
contain secrets, and file paths only where the user supplied them.
"""

from __future__ import annotations


class LlmosError(Exception):
    """Base class. ``param`` names the offending input field when there is one."""

    code: str = "internal_error"
    type: str = "server_error"
    status: int = 500

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return self.message


# --- input errors (400) ---------------------------------------------------------------------------------------------


class InvalidInputError(LlmosError):
    """The request or command arguments are malformed."""

    code = "invalid_input"
    type = "invalid_request_error"
    status = 400


class InvalidNameError(InvalidInputError):
    """A model or dataset reference does not follow the name grammar."""

    code = "invalid_name"


class InvalidModelFileError(InvalidInputError):
    """A file offered for import is not a valid model file (truncated, corrupt, absurd header, unknown format)."""

    code = "invalid_model_file"


class ContextLengthExceededError(InvalidInputError):
    """The prompt (plus the requested completion) does not fit the model's context window."""

    code = "context_length_exceeded"


class UnsafeFormatError(InvalidModelFileError):
    """A file uses a format that can execute code when loaded (pickle checkpoints) and is refused."""

    code = "unsafe_format"


class PayloadTooLargeError(InvalidInputError):
    code = "request_too_large"
    status = 413


# --- identity, permission and quota (401, 403, 429) ---


class AuthenticationError(LlmosError):
    """No key, a malformed, unknown, revoked or expired key. The message never echoes the key."""

    code = "invalid_api_key"
    type = "authentication_error"
    status = 401


class PermissionDeniedError(LlmosError):
    code = "permission_denied"
    type = "permission_error"
    status = 403


class RateLimitError(LlmosError):
    """Over a requests- or tokens-per-minute limit; retry after ``retry_after`` seconds."""

    code = "rate_limit_exceeded"
    type = "rate_limit_error"
    status = 429

    def __init__(self, message: str, *, retry_after: float = 1.0, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = headers or {}


class InsufficientQuotaError(LlmosError):
    """The token budget of the key or tenant for the current period is spent."""

    code = "insufficient_quota"
    type = "insufficient_quota"
    status = 429


# --- lookup errors (404) --------------------------------------------------------------------------------------------


class NotFoundError(LlmosError):
    code = "not_found"
    type = "invalid_request_error"
    status = 404


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class UnknownSourceError(NotFoundError):
    """``llmos pull NAME`` for a model that no installed package provides."""

    code = "unknown_model_source"


# --- state errors (409) ---------------------------------------------------------------------------------------------


class ClientDisconnectedError(LlmosError):
    """The client left before its answer was ready; the work was cancelled. Nobody receives this response."""

    code = "client_closed_request"
    type = "invalid_request_error"
    status = 499


class ConflictError(LlmosError):
    code = "conflict"
    type = "invalid_request_error"
    status = 409


class JobFailedError(LlmosError):
    """A job the caller waited for ended without succeeding."""

    code = "job_failed"
    type = "server_error"
    status = 500


# --- storage and environment (5xx) ----------------------------------------------------------------------------------


class StorageError(LlmosError):
    """The store could not complete an operation (disk full, permission, corruption). Nothing was half-written."""

    code = "storage_error"
    type = "server_error"
    status = 507


class DiskFullError(StorageError):
    code = "disk_full"


class IntegrityError(StorageError):
    """Bytes on disk do not match their digest."""

    code = "integrity_error"
    status = 500


class BackendUnavailableError(LlmosError):
    """An inference backend is not installed or cannot run on this machine."""

    code = "backend_unavailable"
    type = "server_error"
    status = 503


class OverloadedError(LlmosError):
    """Admission control refused the request: the waiting queue is full. Retry after ``retry_after`` seconds."""

    code = "server_overloaded"
    type = "server_error"
    status = 503

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InsufficientMemoryError(LlmosError):
    """A model cannot fit the memory budget even with every other model unloaded."""

    code = "insufficient_memory"
    type = "server_error"
    status = 503


class EngineStoppedError(LlmosError):
    code = "engine_stopped"
    type = "server_error"
    status = 503


class ModelCrashedError(EngineStoppedError):
    """The process running the model died (a signal, an OOM kill, a native abort) or stopped answering; requests in
    flight on it end with this. The next request restarts the model."""

    code = "model_crashed"


class ModelRestartingError(LlmosError):
    """The model crashed several times in a row; it is restarted after a back-off of ``retry_after`` seconds."""

    code = "model_restarting"
    type = "server_error"
    status = 503

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelUnavailableError(LlmosError):
    """A registered model cannot be served now: its files are missing or damaged, or it failed to load."""

    code = "model_unavailable"
    type = "server_error"
    status = 503


class ModelLoadError(LlmosError):
    code = "model_load_failed"
    type = "server_error"
    status = 500


class DecodeError(LlmosError):
    """A forward pass of a loaded model failed (the requests in that step fail; the model keeps serving)."""

    code = "decode_failed"
    type = "server_error"
    status = 500


class KvPoolFullError(DecodeError):
    """The backend found no room for a step's tokens in the KV pool (the engine evicts cached prefixes and retries)."""

    code = "kv_pool_full"
    status = 503


class RecordsUnavailableError(LlmosError):
    """A record that must be kept (audit event, usage) cannot be written, so the action is refused: nothing changed."""

    code = "records_unavailable"
    type = "server_error"
    status = 503


class AuditUnavailableError(RecordsUnavailableError):
    """The audit event of a security-relevant change cannot be written; the change was not made."""

    code = "audit_unavailable"


class UsageUnrecordedError(RecordsUnavailableError):
    """Earlier usage of this key is not recorded yet; its requests are refused until it is (never served unmetered)."""

    code = "usage_unrecorded"
