"""Acceptance: a LoRA fine-tune of SmolLM2 on the shipped Q/A data, served right after the job ends.

The shipped data describes a fictional product (facts no model can know). Four phrasings of each fact train; the
fifth phrasing of every fact is held out as validation data and as the exact-match questions. The test checks that
validation perplexity falls by at least 30% and that the served adapter answers held-out questions exactly that the
base model gets wrong; it prints the before/after numbers.
"""

from __future__ import annotations

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from llmos.config import Settings
from llmos.data.shipped import heldout_split, load_qa
from llmos.registry.datasets import store_rows
from llmos.registry.service import Registry
from tests.helpers import ServerProcess, run_cli

FACTS = 20


def normalize(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def exact_matches(client: openai.OpenAI, model: str, rows: list[dict[str, object]]) -> list[bool]:
    def ask(row: dict[str, object]) -> bool:
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": str(row["prompt"])}], max_tokens=32, temperature=0
        )  # the longest answer is 28 tokens: a longer reply cannot match
        return normalize(answer.choices[0].message.content or "") == normalize(str(row["completion"]))

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(ask, rows))


@pytest.mark.timeout(1800)
def test_lora_finetune_lowers_perplexity_and_answers_held_out_questions(converted_settings: Settings) -> None:
    home = converted_settings.home  # smollm2 converted once for the session: the job trains on that copy
    registry = Registry(converted_settings)
    train, heldout = heldout_split([row for row in load_qa() if int(row["fact"]) < FACTS])
    rows = [{**row, "split": "train"} for row in train] + [{**row, "split": "validation"} for row in heldout]
    store_rows(registry, rows, "zephyr-facts", operation="import", report={"source": "shipped"})
    registry.close()

    result = run_cli(
        home, "train", "--base", "smollm2", "--data", "zephyr-facts", "--name", "zephyr-lora", "--epochs", "3",
        "--lr", "1e-3", "--warmup-steps", "5", "--checkpoint-every", "15", "--wait", timeout=1500,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])["metrics"]
    before = math.exp(metrics["initial_validation_loss"])
    after = metrics["validation_perplexity"]

    server = ServerProcess(home)
    try:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", timeout=600)
        base_hits = exact_matches(client, "smollm2:safetensors", heldout)
        tuned_hits = exact_matches(client, "zephyr-lora", heldout)
    finally:
        server.stop()
    fixed = sum(1 for b, t in zip(base_hits, tuned_hits, strict=True) if t and not b)
    print(
        f"\nvalidation perplexity {before:.2f} -> {after:.2f} ({(1 - after / before) * 100:.0f}% lower);"
        f" exact match on {len(heldout)} held-out questions: base {sum(base_hits)}, fine-tuned {sum(tuned_hits)}"
        f" ({fixed} the base got wrong); {metrics['tokens_per_second']:.0f} training tok/s"
    )
    assert after <= 0.7 * before
    assert fixed >= len(heldout) // 5 and sum(tuned_hits) > sum(base_hits)
