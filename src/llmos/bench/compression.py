"""``llmos bench --suite compression``: size, speed and quality of several versions of a model, in one run.

Contract: :func:`run` measures each named version on this machine, one after the other in one process: size on disk,
parameters, backend, prompt and greedy decode tok/s and resident memory (:func:`~llmos.evaluation.compression.
measure_speed`), perplexity on the shipped held-out text (window 512, stride 256; stored as an evaluation report) and
whether the greedy answer to "What is the capital of France?" names Paris. It yields the lines of a Markdown table
(the one in docs/compression.md), led by the CPU model.
"""

from __future__ import annotations

from collections.abc import Iterator

from llmos.config import Settings
from llmos.evaluation.compression import measure_speed
from llmos.evaluation.reports import evaluate
from llmos.registry.service import Registry


def _size(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def run(settings: Settings, names: list[str]) -> Iterator[str]:
    yield "| model | format | quant | params | size | backend | prompt tok/s | decode tok/s | perplexity | Paris? |"
    yield "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    for name in names:
        registry = Registry(settings, maintain=False)
        try:
            view = registry.show(name)
            speed = measure_speed(settings, registry, name)
        finally:
            registry.close()
        quality = evaluate(settings, name, window=512, stride=256)
        params = f"{view.parameter_count / 1e6:.1f}M" if view.parameter_count else "-"
        yield (
            f"| {view.name} | {view.format} | {view.quantization or '-'} | {params} | {_size(view.size)} |"
            f" {speed.backend} | {speed.prompt_tokens_per_second:.1f} | {speed.decode_tokens_per_second:.1f} |"
            f" {quality.metrics['perplexity']:.3f} | {'yes' if 'Paris' in speed.answer else 'no'} |"
        )
