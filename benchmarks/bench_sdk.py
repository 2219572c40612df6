"""Single-stream generation: llmos's SDK against llama-cpp-python's high-level ``Llama`` API.

Both sides load the same GGUF bytes with the same llama.cpp build, threads, context and batch size, and run the
same raw-completion workload greedily, alternating, in one process. Each prompt starts with a unique prefix so
``Llama``'s prompt cache cannot help either side. Reported per side: prompt processing tok/s (prompt tokens / time
to first token) and decode tok/s (tokens after the first / time after the first), medians over the repetitions,
and the llmos / peer ratio. Usage::

    python benchmarks/bench_sdk.py [--model smollm2] [--reps 5] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import llmos
from llmos.config import Settings
from llmos.engine.backends.llamacpp import system_info
from llmos.engine.backends.llamacpp_path import chosen
from llmos.registry.service import Registry

if TYPE_CHECKING:
    from llama_cpp import Llama

BASE_PROMPT = (
    "The history of the printing press begins in the fifteenth century, when craftsmen in Europe combined movable "
    "metal type, oil-based inks and the screw press into a single system. Before that time books were copied by "
    "hand, which made them rare and expensive. The new machines changed the speed at which ideas travelled, the "
    "price of knowledge and the shape of schools, churches and governments. In the following essay we look at the "
    "people, the inventions and the consequences, beginning with the workshops of Mainz and ending with the "
    "newspapers of the eighteenth century. Chapter one: the workshop."
)


@dataclass
class Sample:
    prompt_tokens: int
    completion_tokens: int
    ttft: float
    decode_seconds: float

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.ttft

    @property
    def decode_tps(self) -> float:
        return (self.completion_tokens - 1) / self.decode_seconds


def run_llmos(model: llmos.Model, prompt: str, max_tokens: int) -> Sample:
    start = time.perf_counter()
    first = last = start
    for i, _delta in enumerate(model.stream_text(prompt, raw=True, max_tokens=max_tokens, temperature=0.0)):
        last = time.perf_counter()
        if i == 0:
            first = last
    stats = model.last_stats
    assert stats is not None
    if stats.finish_reason != "length":
        raise SystemExit(f"llmos stopped early ({stats.finish_reason}); choose a longer-running prompt")
    return Sample(stats.prompt_tokens, stats.completion_tokens, first - start, last - first)


def run_peer(llm: Llama, prompt: str, max_tokens: int) -> Sample:
    prompt_tokens = len(llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False))
    start = time.perf_counter()
    first = last = start
    finish = None
    stream = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True)
    for count, chunk in enumerate(stream):
        last = time.perf_counter()
        if count == 0:
            first = last
        finish = chunk["choices"][0]["finish_reason"] or finish
    if finish != "length":
        raise SystemExit(f"llama_cpp stopped early ({finish}); choose a longer-running prompt")
    return Sample(prompt_tokens, max_tokens, first - start, last - first)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    settings = Settings()
    model = llmos.load_model(args.model, settings=settings)  # decides this machine's llama.cpp CPU path for both sides
    from llama_cpp import Llama

    registry = Registry(settings)
    path = registry.resolve(args.model).primary_path
    registry.close()
    peer = Llama(
        str(path),
        n_ctx=min(settings.context_length, model.info.context_length or settings.context_length),
        n_batch=settings.batch_size,
        n_ubatch=settings.batch_size,
        n_threads=settings.threads,
        n_threads_batch=settings.threads,
        verbose=False,
    )

    print(f"CPU: {cpu_name()}; threads: {settings.threads}")
    print(f"llama.cpp: {system_info()}")
    verdict = chosen()
    print(f"CPU path (both sides): {verdict.describe if verdict else 'unknown'}")
    print(f"model: {model.name} ({path.name[:12]}), {args.reps} reps x {args.max_tokens} tokens, greedy, raw prompt")

    runs: dict[str, list[Sample]] = {"llmos": [], "llama_cpp.Llama": []}
    run_llmos(model, "Warm-up. " + BASE_PROMPT, 8)
    run_peer(peer, "Warm-up. " + BASE_PROMPT, 8)
    for rep in range(args.reps):
        order = ("llmos", "llama_cpp.Llama") if rep % 2 == 0 else ("llama_cpp.Llama", "llmos")
        for side in order:
            prompt = f"Edition {rep}, copy for {side}. {BASE_PROMPT}"
            if side == "llmos":
                runs[side].append(run_llmos(model, prompt, args.max_tokens))
            else:
                runs[side].append(run_peer(peer, prompt, args.max_tokens))

    print(f"\n{'':18}{'prompt tok/s':>14}{'decode tok/s':>14}")
    medians = {}
    for side, samples in runs.items():
        prompt_tps = statistics.median(s.prompt_tps for s in samples)
        decode_tps = statistics.median(s.decode_tps for s in samples)
        medians[side] = (prompt_tps, decode_tps)
        print(f"{side:18}{prompt_tps:14.1f}{decode_tps:14.1f}")
    ours, theirs = medians["llmos"], medians["llama_cpp.Llama"]
    print(f"{'ratio llmos/peer':18}{ours[0] / theirs[0]:14.3f}{ours[1] / theirs[1]:14.3f}")
    model.close()


if __name__ == "__main__":
    main()
