"""Training benchmark: ``llmos train --method lora`` against a plain transformers + peft training loop.

Contract: :func:`run` trains the same Hugging Face model (the safetensors copy of the bundled SmolLM2) on the same
rows (the shipped Q/A data, rendered with the same chat template, loss on the answers only), with the same LoRA
configuration, optimizer (AdamW), learning rate, batch size, precision (fp32) and number of steps, each side in its
own subprocess so peak memory (max RSS) is its own; sides alternate (peer, llmos, llmos, peer, ...). Throughput is
trained (non-padding) tokens per second of the training loop, model loading excluded. The peer is the obvious
script: shuffled batches padded to their longest row, ``model(input_ids, attention_mask, labels)``, ``backward``,
``step``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIDES = ("peer", "llmos")


def _rows() -> list[dict[str, Any]]:
    from llmos.data.shipped import heldout_split, load_qa

    train, _ = heldout_split(load_qa())
    return train


def _peer(base: Path, template: str | None, steps: int, batch_size: int, threads: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmos.formats.chat_template import render_chat
    from llmos.training.finetune import LORA_TARGETS
    from llmos.types import ChatMessage

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(
        plain, LoraConfig(r=16, lora_alpha=32, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = []
    for row in _rows():
        user = [ChatMessage(role="user", content=str(row["prompt"]))]
        prompt = render_chat(user, template, add_generation_prompt=True)
        full = render_chat(
            [*user, ChatMessage(role="assistant", content=str(row["completion"]))],
            template,
            add_generation_prompt=False,
        ).rstrip("\n")
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        examples.append((ids, n_prompt))
    order = torch.randperm(len(examples)).tolist()
    model.train()
    tokens = 0
    started = time.perf_counter()
    for step in range(steps):
        chosen = [examples[order[(step * batch_size + i) % len(order)]] for i in range(batch_size)]
        width = max(len(ids) for ids, _ in chosen)
        input_ids = torch.full((batch_size, width), pad, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (ids, n_prompt) in enumerate(chosen):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
            mask[i, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += int(mask.sum())
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "final_loss": float(loss)}


def _ours(base: Path, template: str | None, steps: int, batch_size: int, threads: int) -> dict[str, Any]:
    from llmos.training.finetune import FinetuneConfig, finetune
    from llmos.training.optim import OptimizerConfig

    config = FinetuneConfig(
        method="lora", optimizer=OptimizerConfig(name="adamw", lr=2e-4), batch_size=batch_size, max_steps=steps,
        warmup_steps=0, schedule="constant", checkpoint_every=10**6, precision="fp32", threads=threads,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        result = finetune(
            base, _rows(), [], Path(tmp) / "out", Path(tmp) / "ckpt", config, chat_template=template, log=lambda _: None
        )
    seconds = result.tokens / result.tokens_per_second if result.tokens_per_second else float("nan")
    return {"tokens": result.tokens, "seconds": seconds, "final_loss": result.train_loss}


def side_main(argv: list[str]) -> None:
    """Child process: ``python -m llmos.bench.training SIDE BASE_DIR TEMPLATE_FILE STEPS BATCH THREADS``."""
    side, base, template_file, steps, batch, threads = argv
    template = Path(template_file).read_text() or None
    run_side = _peer if side == "peer" else _ours
    result = run_side(Path(base), template, int(steps), int(batch), int(threads))
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(result), flush=True)


def run(
    base_dir: Path, template: str | None, *, steps: int = 20, batch_size: int = 8, repeats: int = 2, threads: int = 0
) -> list[str]:
    threads = threads or os.cpu_count() or 1
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    with tempfile.NamedTemporaryFile("w", suffix=".jinja", delete=False) as handle:
        handle.write(template or "")
    try:
        for repeat in range(repeats):
            for side in SIDES if repeat % 2 == 0 else SIDES[::-1]:
                command = [
                    sys.executable, "-m", "llmos.bench.training", side, str(base_dir), handle.name, str(steps),
                    str(batch_size), str(threads),
                ]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise RuntimeError(f"{side} run failed:\n{done.stderr[-3000:]}")
                result = json.loads(line[7:])
                results[side].append(result)
                rate = result["tokens"] / result["seconds"]
                print(f"  {side}: {rate:.1f} tok/s, peak RSS {result['peak_rss'] / 2**20:.0f} MiB", file=sys.stderr)
    finally:
        os.unlink(handle.name)
    lines = [f"{'side':<28} {'tok/s':>8} {'peak RSS':>10} {'final loss':>10}"]
    rates = {}
    for side in SIDES:
        tokens = sum(r["tokens"] for r in results[side])
        seconds = sum(r["seconds"] for r in results[side])
        rates[side] = tokens / seconds
        peak = max(r["peak_rss"] for r in results[side]) / 2**20
        label = "llmos train --method lora" if side == "llmos" else "transformers + peft loop"
        lines.append(f"{label:<28} {rates[side]:>8.1f} {peak:>8.0f}Mi {results[side][-1]['final_loss']:>10.3f}")
    lines.append(
        f"throughput ratio llmos/peer: {rates['llmos'] / rates['peer']:.2f} ({steps} steps x {repeats} runs each,"
        f" batch {batch_size}, fp32, LoRA r=16 on all projections, {threads} threads)"
    )
    return lines


if __name__ == "__main__":
    side_main(sys.argv[1:])
