"""Data-parallel perplexity on Ray: the windows of the text are sharded over N Ray tasks, the driver adds them up.

Contract: :class:`RayPerplexity` is a ``perplexity_runner`` for :func:`llmos.evaluation.reports.evaluate`. It joins
the cluster through :func:`llmos.distributed.cluster.connect` and starts ``workers`` tasks of one CPU each; task
``i`` opens the registry of the same llmos home, loads the model version by digest the way a local evaluation does
(:func:`llmos.evaluation.target.open_generator`, llama.cpp with one thread per task) and scores windows ``i, i + N,
...`` of the strided evaluation (:func:`llmos.evaluation.perplexity.perplexity` with ``shard``). Every window is
scored independently with its own context, so the combined ``exp(sum of nll / scored tokens)`` is the perplexity
one process measures. Progress counts finished shards. Task failures (a killed worker) are retried by Ray
(``max_retries``); a task that keeps failing fails the evaluation with :class:`~llmos.errors.JobFailedError`.
Paths are shared between the driver and the tasks (one machine, or a shared file system for the llmos home).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from llmos.config import Settings
from llmos.errors import JobFailedError, LlmosError
from llmos.evaluation.perplexity import PerplexityResult
from llmos.evaluation.runner import Progress


def _score_shard(
    settings: Settings, ref: str, text: str, window: int | None, stride: int | None, backend: str | None, shard: Any
) -> tuple[dict[str, Any], str]:
    """Runs in a Ray worker: one shard's perplexity result and the backend that measured it."""
    from llmos.evaluation.perplexity import perplexity
    from llmos.evaluation.target import open_generator
    from llmos.registry.service import Registry

    settings = settings.model_copy(update={"threads": 1})
    registry = Registry(settings, maintain=False)
    try:
        resolved = registry.resolve(ref, verify=True)
        with open_generator(settings, registry, resolved, backend) as (instance, adapter):
            result = perplexity(instance, text, window=window, stride=stride, adapter=adapter, shard=tuple(shard))
            return result.to_dict(), instance.backend_name
    finally:
        registry.close()


class RayPerplexity:
    """Measure perplexity with ``workers`` Ray tasks (see the module docstring)."""

    def __init__(
        self, address: str, ray_home: Path, *, workers: int = 2, allow_remote: bool = False, max_retries: int = 2
    ) -> None:
        from llmos.distributed.training import check_workers

        self.address, self.ray_home, self.workers = address, ray_home, check_workers(workers)
        self.allow_remote, self.max_retries = allow_remote, max_retries

    def __call__(
        self,
        settings: Settings,
        ref: str,
        text: str,
        window: int | None,
        stride: int | None,
        backend: str | None,
        progress: Progress | None,
    ) -> tuple[PerplexityResult, str]:
        from llmos.distributed.cluster import connect

        ray = connect(self.address, self.ray_home, allow_remote=self.allow_remote)
        task = ray.remote(_score_shard).options(num_cpus=1, max_retries=self.max_retries, retry_exceptions=False)
        started = time.perf_counter()
        pending = [
            task.remote(settings, ref, text, window, stride, backend, (i, self.workers)) for i in range(self.workers)
        ]
        shards: list[tuple[dict[str, Any], str]] = []
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                shards.append(ray.get(done[0]))
                if progress is not None:
                    progress(len(shards), self.workers)
        except LlmosError as exc:  # a shard's own error (bad window, ...); Ray raises a subclass wrapping it
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, LlmosError) else exc) from None
        except ray.exceptions.RayError as exc:
            raise JobFailedError(f"a perplexity shard failed on Ray: {str(exc).splitlines()[0][:300]}") from exc
        finally:
            for ref in pending:  # stopped early (an error, a cancelled job): the other shards stop too
                ray.cancel(ref, force=True)
        seconds = time.perf_counter() - started
        results = [PerplexityResult(**data) for data, _ in shards]
        tokens = sum(r.tokens for r in results)
        nll = sum(r.nll * r.tokens for r in results) / max(tokens, 1)
        first = results[0]
        combined = PerplexityResult(
            perplexity=math.exp(nll) if tokens else math.nan,
            nll=nll,
            tokens=tokens,
            windows=sum(r.windows for r in results),
            window=first.window,
            stride=first.stride,
            seconds=seconds,
            tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        )
        return combined, f"{shards[0][1]}, {self.workers} Ray workers"
