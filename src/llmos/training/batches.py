"""Training examples and batches: dataset rows to token ids and labels, a seeded batch order, padded tensors.

Contract:

* :func:`encode_rows`: ``prompt``/``completion`` and chat ``messages`` rows are rendered with the model's chat
  template (the same one serving uses) and carry labels only on the answer (assistant) tokens; ``text`` rows carry
  a label on every token. Sequences are cut to ``max_length``; rows left with no label after the first token are
  dropped. A label of :data:`IGNORE` marks a position with no loss.
* :func:`batch_order`: row indices per batch for one epoch, shuffled and then grouped by length within windows of 16
  batches (less padding); it depends only on the seed and the epoch, so a resumed run re-derives it.
* :func:`collate`: right-padded ``input_ids``, ``labels`` (:data:`IGNORE` on padding) and ``attention_mask``.

torch and the tokenizer are used inside functions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmos.data.rows import dataset_shape
from llmos.errors import InvalidInputError
from llmos.formats.chat_template import render_chat
from llmos.types import ChatMessage

IGNORE = -100
"""The label of a position that carries no loss (PyTorch's cross-entropy ``ignore_index``)."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def loss_tokens(self) -> int:
        """Positions that predict a labelled token (every label but the first can be predicted)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def encode_rows(
    rows: Sequence[dict[str, Any]], tokenizer: Any, chat_template: str | None, max_length: int
) -> list[Example]:
    """Token ids and labels for every row; rows with no loss tokens are dropped."""
    shape = dataset_shape(list(rows))
    eos = tokenizer.eos_token or ""
    bos = tokenizer.bos_token or ""
    examples = []
    for row in rows:
        if shape == "text":
            ids = tokenizer(str(row["text"]) + eos, add_special_tokens=False)["input_ids"][:max_length]
            labels = list(ids)
        else:
            if shape == "completion":
                messages = [ChatMessage(role="user", content=str(row["prompt"]))]
                answer = str(row["completion"])
            else:
                turns = [ChatMessage(role=m["role"], content=str(m["content"])) for m in row["messages"]]
                if turns[-1].role != "assistant":
                    raise InvalidInputError("a chat row for training must end with an assistant message")
                messages, answer = turns[:-1], turns[-1].content
            prompt = render_chat(messages, chat_template, bos_token=bos, eos_token=eos, add_generation_prompt=True)
            full = render_chat(
                [*messages, ChatMessage(role="assistant", content=answer)],
                chat_template,
                bos_token=bos,
                eos_token=eos,
                add_generation_prompt=False,
            )
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            full_ids = tokenizer(full.rstrip("\n"), add_special_tokens=False)["input_ids"]
            if full_ids[: len(prompt_ids)] != prompt_ids:  # template re-tokenized differently at the seam
                answer_ids = tokenizer(full[len(prompt) :].rstrip("\n"), add_special_tokens=False)["input_ids"]
                full_ids = prompt_ids + answer_ids
            ids = full_ids[:max_length]
            labels = [IGNORE] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids) :]
        example = Example(list(ids), labels)
        if example.loss_tokens:
            examples.append(example)
    return examples


def batch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Row indices per batch for one epoch: shuffled, then grouped by length within windows of 16 batches."""
    import torch

    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    permutation = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in permutation]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """``input_ids``, ``labels`` and ``attention_mask`` tensors ``[len(examples), longest]``, right-padded."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
