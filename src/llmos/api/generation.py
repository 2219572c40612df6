"""Running a set of generation requests for one HTTP call: submit, merge streams, observe, cancel.

Contract: :func:`acquire` resolves the requested name once, to one version (``repository@digest``), checks that the
caller may use it, and leases that very version from the residency manager (loading and evicting as needed); for a
LoRA adapter it leases the adapter's base by digest and loads the adapter's own digest. A tag moved meanwhile changes
nothing for the request: what was authorised is what answers. The returned :class:`Target` holds a lease until
released; its :attr:`~Target.name` is the name the caller asked for (normalised, ``smollm2`` -> ``smollm2:latest``),
whichever name loaded the model first. :func:`submit_all` queues every choice of a call on the
model's engine before any response byte is sent, so admission errors (503 with ``Retry-After``) are proper HTTP
errors; if one choice is refused the others are aborted and the lease released. :class:`Call` then yields
``(choice_index, output)`` pairs as the engine produces them, records queue wait, time to first token, inter-token
latency, tokens (per model and tenant) and finish reasons in the metrics, and the queue and generation spans when
tracing is on; it aborts every unfinished choice if the consumer goes away (client disconnect) or fails, records the
request's final status for the request counter, and releases the lease (applying the request's keep-alive) when it
ends. Usage counts what the engine generated, finished or not: after an abort the call waits (briefly, shielded from
the cancellation that ended it) for the engine's final count of each aborted choice, and settles the quota and the
usage record with every token the engine produced for the request, read by the client or not. The caller's name
becomes the request's ``model`` for logs, metrics and traces.

Prefix cache and speculative decoding: :func:`engine_options` turns a body's ``cache_prompt`` / ``speculative`` into
what the engine request carries: both are off when the server turned them off, and the prefix scope is the caller's
tenant when the caller authenticated with a key (unless ``prefix_cache_shared``), so one tenant's requests never hit
another's cached prompts. :class:`Call` counts each finished request's prompt tokens taken from the prefix cache and
computed (``llmos_prefix_cache_hit_tokens_total`` / ``..._miss_tokens_total``) from its final event, aborted ones
included, and :meth:`Call.cached_prompt_tokens` gives the call's ``usage.prompt_tokens_details.cached_tokens``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from anyio import to_thread
from fastapi import Request

from llmos.api.auth import set_response_headers, visible_view
from llmos.api.state import AppState
from llmos.config import Settings
from llmos.engine.request import GenerationOutput, GenerationRequest
from llmos.engine.streams import AsyncOutputStream
from llmos.errors import ClientDisconnectedError, InvalidInputError, LlmosError, OverloadedError
from llmos.observability.context import current_request, set_model, set_outcome
from llmos.observability.metrics import Metrics
from llmos.registry.names import parse_ref
from llmos.registry.views import VersionView
from llmos.runtime.model import LoadedModel
from llmos.runtime.replicas import ReplicaSet
from llmos.runtime.residency import Lease, parse_keep_alive
from llmos.security.principal import Principal
from llmos.security.quotas import Reservation
from llmos.types import SamplingParams

ABORT_GRACE_S = 10.0
"""How long a call that ends early waits for the engine's final token count of its aborted choices (the engine
sends it within one step); past it, the tokens seen so far are charged."""

T = TypeVar("T")


@dataclass
class Metering:
    """Quota reservation and usage record of one request; :meth:`finish` settles both exactly once."""

    state: AppState
    caller: Principal
    reservation: Reservation
    request_id: str
    endpoint: str
    started: float
    done: bool = False

    def finish(self, model: str, prompt_tokens: int, completion_tokens: int, status: int = 200) -> None:
        if self.done:
            return
        self.done = True
        self.state.quotas.settle(self.reservation, prompt_tokens + completion_tokens)
        if not self.state.settings.usage_records:
            return
        self.state.security.record_usage(
            request_id=self.request_id,
            tenant=self.caller.tenant,
            key_prefix=self.caller.key_prefix,
            model=model,
            endpoint=self.endpoint,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_ms=int((time.monotonic() - self.started) * 1000),
            status=status,
        )


async def meter(
    state: AppState, request: Request, caller: Principal, tokens: int, endpoint: str, arrived: float
) -> Metering:
    """Reserve ``tokens`` against every limit of the caller (429 if any is exhausted) and start metering; the
    reservation may write to the database (token budgets), so it runs off the event loop."""
    reservation = await to_thread.run_sync(state.quotas.reserve, caller, tokens)
    set_response_headers(request, reservation.headers)
    request_id = request.scope.get("state", {}).get("request_id", "")
    return Metering(state, caller, reservation, request_id, endpoint, arrived)


@dataclass(frozen=True)
class EngineOptions:
    """The caller's fields of every engine request of one call: fairness, prefix-cache scope, speculative decoding."""

    fairness_key: str | None
    prefix_scope: str | None
    cache_prompt: bool
    speculative: bool


def engine_options(settings: Settings, caller: Principal, *, cache_prompt: bool, speculative: bool) -> EngineOptions:
    """A body's ``cache_prompt`` / ``speculative`` as the server allows them, and the caller's prefix-cache scope.

    With authentication on (the caller came with a key), cached prefixes are shared within the caller's tenant only,
    unless ``prefix_cache_shared``: a cache hit is faster, and that timing would tell one tenant what another sent.
    """
    authenticated = caller.key_prefix is not None
    return EngineOptions(
        fairness_key=caller.tenant,
        prefix_scope=caller.tenant if authenticated and not settings.prefix_cache_shared else None,
        cache_prompt=cache_prompt and settings.prefix_cache,
        speculative=speculative and settings.speculative != "off",
    )


@dataclass
class Target:
    lease: Lease
    model: LoadedModel
    adapter: str | None
    """The backend's key for the adapter: its repository and digest, so an alias moved to a new version loads that
    one (and two names of one version share it)."""
    keep_alive: float | None
    name: str
    """The name responses, metrics and usage report: the one the caller asked for, resolved (``repository:tag``)."""
    digest: str
    """The registry version that answers (the adapter's when one was asked for): the one the caller was authorised
    for."""

    @property
    def fingerprint(self) -> str:
        """OpenAI's ``system_fingerprint``: which stored version produced the answer (``llmos-`` + 12 hex digits)."""
        return f"llmos-{self.digest.removeprefix('sha256:')[:12]}"

    def release(self) -> None:
        self.lease.release(self.keep_alive)

    @contextlib.contextmanager
    def held_until_submitted(self) -> Iterator[None]:
        """Around the preparation of a call (tokenizing, checks, metering): the lease is released if anything there
        fails; on success it stays held for :func:`submit_all`, which takes it over."""
        try:
            yield
        except BaseException:
            self.release()
            raise

    def request(
        self, prompt: list[int], sampling: SamplingParams, options: EngineOptions, **fields: Any
    ) -> GenerationRequest:
        """An engine request for this target's model and adapter with the caller's ``options``."""
        return GenerationRequest(
            prompt,
            sampling,
            adapter=self.adapter,
            fairness_key=options.fairness_key,
            prefix_scope=options.prefix_scope,
            cache_prompt=options.cache_prompt,
            speculative=options.speculative,
            **fields,
        )


async def authorised_view(state: AppState, caller: Principal, name: str) -> VersionView:
    """The one resolution of a request's model name: the version it names now, if the caller may use it (else 404).

    Everything after this (leasing, loading an adapter, reporting) goes by the returned view's digest.
    """
    view = visible_view(caller, await to_thread.run_sync(state.registry.show, name), name)
    set_model(view.name)
    return view


async def acquire(state: AppState, caller: Principal, name: str, keep_alive_value: object = None) -> Target:
    keep_alive = parse_keep_alive(keep_alive_value)  # type: ignore[arg-type]
    view = await authorised_view(state, caller, name)
    adapter: str | None = None
    leased: VersionView | str = view
    if view.format == "lora":
        adapter = f"{view.repository}@{view.digest}"
        base_repository = parse_ref(str(view.details.get("base_name", ""))).repository
        leased = f"{base_repository}@{view.details.get('base_digest')}"  # pinned by the adapter's own record
    lease = await to_thread.run_sync(state.residency.lease, leased, keep_alive)
    model = lease.instance
    try:
        if isinstance(model, ReplicaSet):
            model = model.pick()
        if not isinstance(model, LoadedModel):
            raise InvalidInputError(f"{view.name} is an embedding model; use /v1/embeddings", param="model")
        if adapter is not None:
            backend = model.backend
            if not hasattr(backend, "add_adapter"):
                raise InvalidInputError(f"adapter {view.name} needs its base on the PyTorch backend", param="model")
            if adapter not in getattr(backend, "adapters", {}):
                pinned = adapter

                def load_adapter() -> None:
                    resolved = state.registry.resolve(pinned, verify=True)
                    with state.registry.loadable_dir(resolved) as adapter_dir:
                        backend.add_adapter(pinned, adapter_dir)

                await to_thread.run_sync(load_adapter)
    except BaseException:
        lease.release(keep_alive)
        raise
    return Target(lease, model, adapter, keep_alive, view.name, view.digest)


@dataclass
class Call:
    target: Target
    requests: list[GenerationRequest]
    streams: list[AsyncOutputStream]
    metrics: Metrics
    arrived: float
    metering: Metering | None = None
    prompt_tokens: int = 0
    finished: set[int] = field(default_factory=set)
    submitted: float = field(default_factory=time.monotonic)
    tenant: str | None = None
    cached: dict[int, int] = field(default_factory=dict)
    """Per choice whose final event arrived: its prompt tokens taken from the prefix cache."""

    @property
    def model(self) -> LoadedModel:
        return self.target.model

    async def outputs(self) -> AsyncIterator[tuple[int, GenerationOutput]]:
        metrics, label = self.metrics, self.target.name
        # the per-token histograms' children, looked up once per call rather than once per token
        first_token, between_tokens = (
            metrics.time_to_first_token.labels(label),
            metrics.inter_token_latency.labels(label),
        )
        context = current_request()
        last_token_at: dict[int, float] = {}
        admitted: dict[int, float] = {}
        counted = 0  # completion tokens already added to the token counter (at each choice's finish)
        status = 200
        try:
            async for index, output in self._merged():
                if index not in admitted and output.admitted_at is not None:
                    admitted[index] = output.admitted_at
                    metrics.queue_wait.labels(label).observe(max(0.0, output.admitted_at - self.submitted))
                if output.token_ids:
                    # one observation per token after the first: an event carrying several tokens (speculative
                    # decoding's accepted drafts) spreads its gap over them, so the count is completion tokens - 1
                    previous, count = last_token_at.get(index), len(output.token_ids)
                    if previous is None:
                        first_token.observe(output.time - self.arrived)
                        gaps, gap = count - 1, 0.0
                    else:
                        gaps, gap = count, (output.time - previous) / count
                    for _ in range(gaps):
                        between_tokens.observe(gap)
                    last_token_at[index] = output.time
                if output.finished:
                    self.finished.add(index)
                    counted += output.completion_tokens
                    self._count_cache(index, output)
                    metrics.finished.labels(label, output.finish_reason or "unknown").inc()
                    metrics.count_tokens(label, self.tenant, completion=output.completion_tokens)
                    if context is not None and context.tracing is not None:
                        context.tracing.record_generation(
                            context,
                            choice=index,
                            submitted=self.submitted,
                            admitted=admitted.get(index),
                            finished=output.time,
                            prompt_tokens=output.prompt_tokens,
                            completion_tokens=output.completion_tokens,
                            finish_reason=output.finish_reason,
                        )
                yield index, output
        except BaseException as exc:
            status = exc.status if isinstance(exc, LlmosError) else 499
            raise
        finally:
            set_outcome(status)
            self.abort_unfinished()
            try:
                await self.engine_done()
                self._count_unread_cache()
            finally:
                self.target.release()
                produced = self.produced
                if produced > counted:  # tokens of aborted choices: generated, so counted and charged
                    metrics.count_tokens(label, self.tenant, completion=produced - counted)
                if self.metering is not None:
                    self.metering.finish(self.target.name, self.prompt_tokens, produced, status)

    def _count_cache(self, index: int, output: GenerationOutput) -> None:
        """Record a choice's final prefix-cache outcome (once per choice)."""
        if index in self.cached:
            return
        self.cached[index] = output.cached_tokens
        self.metrics.count_prefix_cache(self.target.name, output.prompt_tokens, output.cached_tokens)

    def _count_unread_cache(self) -> None:
        """The prefix-cache outcome of choices whose final event arrived unread (the consumer stopped early)."""
        for index, stream in enumerate(self.streams):
            if index in self.cached or not stream.finished:
                continue
            last: GenerationOutput | None = None
            while not stream.queue.empty():  # nobody reads this stream any more: its final event is the last one
                last = stream.queue.get_nowait()
            if last is not None and last.finished and last.error is None:
                self._count_cache(index, last)

    def cached_prompt_tokens(self, choices_per_prompt: int = 1) -> int:
        """``usage.prompt_tokens_details.cached_tokens``: of the prompt tokens usage counts, those that came from the
        prefix cache.

        Usage counts each prompt once however many choices it has (``n``), so a prompt counts as cached as far as
        every one of its choices found it cached: the fewest cached tokens among its choices (requests are ordered
        prompt by prompt, ``choices_per_prompt`` each). Choices that never finished count as nothing cached.
        """
        total = 0
        for start in range(0, len(self.requests), choices_per_prompt):
            total += min(self.cached.get(i, 0) for i in range(start, start + choices_per_prompt))
        return total

    @property
    def produced(self) -> int:
        """Completion tokens the engine generated for this call so far, whether the client read them or not."""
        return sum(stream.produced for stream in self.streams)

    async def engine_done(self, timeout: float = ABORT_GRACE_S) -> None:
        """Wait until the engine has sent every choice's final count (at most ``timeout``), even in a cancelled task."""
        pending = [stream for stream in self.streams if not stream.finished]
        if not pending:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
            for stream in pending:
                await stream.ended()

    def abort_unfinished(self) -> None:
        for index, request in enumerate(self.requests):
            if index not in self.finished:
                self.model.engine.abort(request.request_id)
                self.finished.add(index)
                self.metrics.finished.labels(self.target.name, "cancelled").inc()

    async def _merged(self) -> AsyncIterator[tuple[int, GenerationOutput]]:
        if len(self.streams) == 1:
            async for output in self.streams[0]:
                yield 0, output
            return
        queue: asyncio.Queue[tuple[int, GenerationOutput | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, stream: AsyncOutputStream) -> None:
            try:
                async for output in stream:
                    await queue.put((index, output))
            except BaseException as exc:  # re-raised in the consumer
                await queue.put((index, exc))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()


def submit_all(
    target: Target,
    requests: list[GenerationRequest],
    metrics: Metrics,
    *,
    prompt_tokens: int,
    arrived: float,
    metering: Metering | None = None,
) -> Call:
    model = target.model
    streams: list[AsyncOutputStream] = []
    submitted: list[GenerationRequest] = []
    submitted_at = time.monotonic()
    try:
        for request in requests:
            stream = AsyncOutputStream()
            model.engine.submit(request, stream)
            streams.append(stream)
            submitted.append(request)
    except BaseException as exc:
        if isinstance(exc, OverloadedError):
            metrics.rejected.labels(target.name).inc()
        for request in submitted:
            model.engine.abort(request.request_id)
        target.release()
        if metering is not None:
            metering.finish(target.name, 0, 0, exc.status if isinstance(exc, LlmosError) else 500)
        raise
    tenant = metering.caller.tenant if metering is not None else None
    metrics.count_tokens(target.name, tenant, prompt=prompt_tokens)
    return Call(
        target,
        requests,
        streams,
        metrics,
        arrived=arrived,
        metering=metering,
        prompt_tokens=prompt_tokens,
        submitted=submitted_at,
        tenant=tenant,
    )


DISCONNECT_POLL_SECONDS = 0.25


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` (the whole of a non-streamed answer); if the client goes away first, cancel it, which aborts
    its generation and frees its slot and KV cache (a stream is cancelled by the server when its client leaves;
    an answer sent at the end needs this watch, or an abandoned request generates to its token limit)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise ClientDisconnectedError("the client closed the connection before the answer was ready")
    finally:
        if not task.done():
            task.cancel()
