"""The job kinds a worker can run: kind name -> handler taking a JobContext and returning the job's result."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmos.jobs.distill import run_distill
from llmos.jobs.evaluate import run_eval
from llmos.jobs.pipeline import run_pipeline
from llmos.jobs.scratch import run_scratch
from llmos.jobs.train import run_train

if TYPE_CHECKING:
    from llmos.jobs.context import JobContext

HANDLERS: dict[str, Callable[[JobContext], dict[str, Any]]] = {
    "train": run_train,
    "scratch": run_scratch,
    "pipeline": run_pipeline,
    "eval": run_eval,
    "distill": run_distill,
}
