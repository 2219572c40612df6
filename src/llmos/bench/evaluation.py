"""Evaluation benchmark: ``llmos eval`` perplexity throughput against a plain transformers strided loop.

Contract: :func:`run` scores the same text (the held-out text shipped with llmos) with the same model (the float32
safetensors copy of the bundled SmolLM2), the same window and stride (``llmos eval``'s defaults: 1024 and 512) and
the same number of threads, three ways, each in its own subprocess, in rotating order (peer, llmos, gguf, then
llmos, gguf, peer, ...):

* ``peer``: the strided loop of the transformers perplexity guide with ``AutoModelForCausalLM``: each window goes
  through ``model(input_ids, labels=...)`` with the labels of the tokens an earlier window scored set to -100, and
  the mean loss times the tokens scored adds to the total;
* ``llmos``: what ``llmos eval MODEL`` runs (:func:`llmos.evaluation.perplexity.perplexity` on a model loaded by the
  runtime's loader, PyTorch backend), without storing a report;
* ``gguf``: the same on the GGUF model (llama.cpp backend), printed for reference (another precision, Q4_1).

Throughput is tokens scored per second of wall-clock time, model loading excluded; tokens per CPU-second (all
threads of the process) is printed next to it, a number that other load on the machine disturbs less. The engine
thread of llmos runs at nice +5 (a server keeps its HTTP loop responsive that way); the peer process is given the
same niceness, so load from other processes does not favour either side. The ratios are llmos / transformers on the
torch side.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SIDES = ("peer", "llmos", "gguf")
LABELS = {
    "peer": "transformers loop (fp32)",
    "llmos": "llmos eval, torch (fp32)",
    "gguf": "llmos eval, llama.cpp (GGUF)",
}
ENGINE_NICENESS = 5
"""The niceness of llmos's engine thread (see :mod:`llmos.engine.core`)."""


def _text() -> str:
    from llmos.data.shipped import heldout_text_path

    return heldout_text_path().read_text(encoding="utf-8")


def _peer(model_dir: Path, window: int, stride: int, threads: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.nice(ENGINE_NICENESS)
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    ids = tokenizer(_text(), return_tensors="pt").input_ids[0]
    started, cpu = time.perf_counter(), time.process_time()
    nll, count, previous_end, begin = 0.0, 0, 1, 0
    while previous_end < len(ids):
        end = min(begin + window, len(ids))
        chunk = ids[begin:end].unsqueeze(0)
        scored = end - previous_end  # the tokens no earlier window scored
        labels = chunk.clone()
        labels[:, :-scored] = -100
        with torch.no_grad():
            loss = model(chunk, labels=labels).loss  # mean over the scored tokens
        nll += float(loss) * scored
        count += scored
        previous_end = end
        begin = end - (window - stride)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"tokens": count, "seconds": seconds, "cpu_seconds": cpu, "perplexity": math.exp(nll / count)}


def _ours(home: str, name: str, backend: str, window: int, stride: int, threads: int) -> dict[str, Any]:
    from llmos.config import Settings
    from llmos.evaluation.perplexity import perplexity
    from llmos.evaluation.reports import perplexity_settings
    from llmos.registry.service import Registry
    from llmos.runtime.loader import Loader
    from llmos.runtime.model import LoadedModel

    settings = perplexity_settings(Settings(home=Path(home), threads=threads), window)  # as `llmos eval` loads
    registry = Registry(settings, maintain=False)
    try:
        resolved = registry.resolve(name, verify=True)
        loader = Loader(settings, registry, max_running=4)
        model = loader(resolved, backend)
        assert isinstance(model, LoadedModel)
        try:
            cpu = time.process_time()
            result = perplexity(model, _text(), window=window, stride=stride)
            cpu = time.process_time() - cpu
        finally:
            model.close()
    finally:
        registry.close()
    return {"tokens": result.tokens, "seconds": result.seconds, "cpu_seconds": cpu, "perplexity": result.perplexity}


def side_main(argv: list[str]) -> None:
    """Child process: ``python -m llmos.bench.evaluation SIDE HOME MODEL_DIR_OR_NAME WINDOW STRIDE THREADS``."""
    side, home, target, window, stride, threads = argv
    if side == "peer":
        result = _peer(Path(target), int(window), int(stride), int(threads))
    else:
        backend = "torch" if side == "llmos" else "llama.cpp"
        result = _ours(home, target, backend, int(window), int(stride), int(threads))
    print("RESULT " + json.dumps(result), flush=True)


def run(
    home: Path,
    model_dir: Path,
    hf_name: str,
    gguf_name: str | None,
    *,
    window: int = 1024,
    stride: int = 512,
    repeats: int = 3,
    threads: int = 0,
) -> list[str]:
    threads = threads or len(os.sched_getaffinity(0))
    sides = [s for s in SIDES if s != "gguf" or gguf_name]
    targets = {"peer": str(model_dir), "llmos": hf_name, "gguf": gguf_name or ""}
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for repeat in range(repeats):
        shift = repeat % len(sides)
        for side in sides[shift:] + sides[:shift]:
            command = [
                sys.executable, "-m", "llmos.bench.evaluation", side, str(home), targets[side], str(window),
                str(stride), str(threads),
            ]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"{side} run failed:\n{done.stderr[-3000:]}")
            result = json.loads(line[7:])
            results[side].append(result)
            rate = result["tokens"] / result["seconds"]
            print(f"  {side}: {rate:.1f} tok/s (perplexity {result['perplexity']:.3f})", file=sys.stderr)
    lines = [f"{'side':<30} {'tok/s':>8} {'tok/cpu-s':>10} {'perplexity':>10} {'runs (tok/s)':>24}"]
    rates, cpu_rates = {}, {}
    for side in sides:
        tokens = sum(r["tokens"] for r in results[side])
        rates[side] = tokens / sum(r["seconds"] for r in results[side])
        cpu_rates[side] = tokens / sum(r["cpu_seconds"] for r in results[side])
        runs = " ".join(f"{r['tokens'] / r['seconds']:.0f}" for r in results[side])
        perplexity = results[side][-1]["perplexity"]
        lines.append(f"{LABELS[side]:<30} {rates[side]:>8.1f} {cpu_rates[side]:>10.1f} {perplexity:>10.3f} {runs:>24}")
    lines.append(
        f"throughput ratio llmos/transformers (torch, fp32): {rates['llmos'] / rates['peer']:.2f} wall-clock,"
        f" {cpu_rates['llmos'] / cpu_rates['peer']:.2f} per CPU-second (window {window}, stride {stride},"
        f" {results['peer'][-1]['tokens']} tokens scored per run, {repeats} runs each, {threads} threads)"
    )
    return lines


if __name__ == "__main__":
    side_main(sys.argv[1:])
