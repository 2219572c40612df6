"""Running a generation or multiple-choice task on a loaded model, through its engine.

Contract:

* Prompts are built the way the SDK and the HTTP API build them (:class:`~llmos.runtime.model.LoadedModel`): chat
  turns, or a plain prompt as one user turn, rendered with the model's chat template when the task uses it (by
  default when the model has one), else the plain prompt as raw text.
* :func:`run_generate` answers every item greedily (``temperature 0``, the task's ``max_tokens`` and ``stop``),
  all submitted at once so the engine batches them, then scores the answers with the task's metric.
* :func:`run_multiple_choice` scores each choice by the log-likelihood of its tokens after the prompt, computed like
  ``/v1/completions`` with ``echo`` and ``logprobs`` (a prompt-scoring request: ``prompt_logprobs``, no generated
  token); the prediction is the choice with the highest total (``accuracy``) or the highest per character
  (``accuracy_norm``). Without the chat template a space separates the prompt from a choice unless the prompt ends
  in whitespace.
* A prompt that does not fit the model's context is an error naming the row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llmos.engine.request import GenerationRequest
from llmos.errors import InvalidInputError
from llmos.evaluation.metrics import choice_accuracy, score_generations
from llmos.evaluation.runner import Progress, run_requests
from llmos.evaluation.tasks import ChoiceItem, GenerateItem, Prompt, TaskSpec
from llmos.runtime.model import LoadedModel
from llmos.types import ChatMessage, SamplingParams

EXAMPLES = 3
"""Items whose prompt, answer and reference are kept in the report, to see what the numbers mean."""


@dataclass
class TaskResult:
    metrics: dict[str, float]
    samples: int
    tokens: int
    """Generated tokens (generate) or scored prompt tokens (multiple choice)."""
    seconds: float
    chat: bool
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def uses_chat(spec: TaskSpec, model: LoadedModel) -> bool:
    if spec.chat is not None:
        return spec.chat
    return (model.chat_template or model.view.chat_template) is not None


def prompt_tokens(model: LoadedModel, prompt: Prompt, chat: bool, index: int, reserve: int = 1) -> list[int]:
    if isinstance(prompt, tuple):
        tokens = model.chat_tokens(prompt)
    elif chat:
        tokens = model.chat_tokens([ChatMessage("user", prompt)])
    else:
        tokens = model.text_tokens(prompt)
    if len(tokens) + reserve > model.engine.max_context:
        raise InvalidInputError(
            f"row {index}: the prompt is {len(tokens)} tokens, which with {reserve} more does not fit the model's"
            f" context of {model.engine.max_context} tokens",
            param="data",
        )
    return tokens


def _shown(prompt: Prompt) -> str:
    text = prompt if isinstance(prompt, str) else "\n".join(f"{m.role}: {m.content}" for m in prompt)
    return text if len(text) <= 300 else text[:300] + "..."


def run_generate(
    model: LoadedModel,
    spec: TaskSpec,
    items: Sequence[GenerateItem],
    progress: Progress | None = None,
    adapter: str | None = None,
) -> TaskResult:
    chat = uses_chat(spec, model)
    params = SamplingParams(max_tokens=spec.max_tokens, temperature=0.0, stop=spec.stop)
    requests = [
        GenerationRequest(prompt_tokens(model, item.prompt, chat, i), params, priority=1)
        for i, item in enumerate(items)
    ]
    started = time.perf_counter()
    collected = run_requests(model, requests, progress, adapter)
    seconds = time.perf_counter() - started
    predictions = [c.text.strip() for c in collected]
    references = [item.reference for item in items]
    metrics = score_generations(spec.metric, predictions, references)
    examples = [
        {"prompt": _shown(item.prompt), "prediction": prediction, "reference": item.reference}
        for item, prediction in zip(items[:EXAMPLES], predictions, strict=False)
    ]
    generated = sum(c.completion_tokens for c in collected)
    return TaskResult(metrics, len(items), generated, seconds, chat, examples)


def run_multiple_choice(
    model: LoadedModel,
    spec: TaskSpec,
    items: Sequence[ChoiceItem],
    progress: Progress | None = None,
    adapter: str | None = None,
) -> TaskResult:
    chat = uses_chat(spec, model)
    params = SamplingParams(max_tokens=0, temperature=0.0)
    requests: list[GenerationRequest] = []
    lengths: list[list[int]] = []
    for index, item in enumerate(items):
        context = prompt_tokens(model, item.prompt, chat, index)
        separator = "" if chat or (isinstance(item.prompt, str) and item.prompt[-1:].isspace()) else " "
        counts = []
        for choice in item.choices:
            continuation = model.backend.tokenize(separator + choice, add_special=False, parse_special=False)
            if not continuation:
                raise InvalidInputError(f"row {index}: choice {choice!r} has no tokens", param="choices")
            full = context + continuation
            if len(full) >= model.engine.max_context:
                raise InvalidInputError(
                    f"row {index}: prompt and choice {choice[:40]!r} are {len(full)} tokens, beyond the model's"
                    f" context of {model.engine.max_context}",
                    param="data",
                )
            requests.append(GenerationRequest(full, params, prompt_logprobs=True, priority=1))
            counts.append(len(continuation))
        lengths.append(counts)
    started = time.perf_counter()
    collected = run_requests(model, requests, progress, adapter)
    seconds = time.perf_counter() - started
    scores: list[list[float]] = []
    position = 0
    for counts in lengths:
        row = []
        for count in counts:
            logprobs = collected[position].prompt_logprobs[-count:]
            row.append(sum(lp.logprob for lp in logprobs if lp.logprob is not None))
            position += 1
        scores.append(row)
    metrics = choice_accuracy(scores, [item.choices for item in items], [item.answer for item in items])
    examples = [
        {
            "prompt": _shown(item.prompt),
            "choices": list(item.choices),
            "answer": item.choices[item.answer],
            "picked": item.choices[max(range(len(row)), key=lambda j: row[j])],
        }
        for item, row in zip(items[:EXAMPLES], scores, strict=False)
    ]
    scored = sum(len(r.prompt_tokens) for r in requests)
    return TaskResult(metrics, len(items), scored, seconds, chat, examples)
