"""Fine-tuning a Hugging Face causal LM (full or LoRA) on dataset rows, with checkpoints that make it resumable.

Contract: :func:`finetune` trains ``base_dir`` (a Hugging Face checkpoint directory) on ``train_rows`` and writes the
result into ``output_dir``: a peft LoRA adapter directory (``method="lora"``) or a full Hugging Face checkpoint
(``method="full"``, tokenizer included). It returns a :class:`FinetuneResult` with the final and best validation loss
and perplexity, tokens trained on and tokens per second.

* Rows: ``prompt``/``completion`` and chat ``messages`` rows are rendered with the model's chat template (the same
  one serving uses), and the loss covers only the answer (assistant) tokens; ``text`` rows train on every token.
  Sequences are cut to ``max_length``. Batches group rows of similar length (less padding), in an order that
  depends only on the seed and the epoch.
* Optimizer and schedule come from :mod:`llmos.training.optim`; ``grad_accum`` micro-batches make one step.
* Every ``checkpoint_every`` steps (and when stopped), the trainable weights, optimizer, schedule, step and best
  validation loss are written as ``step-NNNNNNN`` by :class:`~llmos.training.checkpoints.Checkpoints` (``checkpoints``:
  one, or a directory for plaintext ones): atomic, private (0600 files in 0700 directories), encrypted when it
  holds a cipher; the two newest are kept. A run started with the same arguments and an existing checkpoint
  continues from the newest one that loads, so an interrupted job ends where an uninterrupted one would. A failed
  write (disk full) raises :class:`~llmos.errors.StorageError` and leaves earlier checkpoints intact. The output
  directory is created private (0700).
* Validation loss runs every ``eval_every`` steps and at the end; with ``patience``, training stops early after that
  many evaluations without improvement.
* ``on_step(step, total, metrics)`` is called after every optimizer step; it returns True to stop (cancellation):
  a checkpoint is written and :class:`TrainingStopped` is raised.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmos.data.rows import dataset_shape
from llmos.errors import InvalidInputError
from llmos.formats.chat_template import render_chat
from llmos.training.checkpoints import Checkpoints, make_private_dir
from llmos.training.optim import OptimizerConfig, build_optimizer, build_schedule
from llmos.types import ChatMessage

METHODS = ("lora", "full")
PRECISIONS = ("auto", "fp32", "bf16")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
StepCallback = Callable[[int, int, dict[str, float]], bool]


class TrainingStopped(Exception):
    """Raised when ``on_step`` asked to stop; the last checkpoint holds the progress."""


@dataclass
class FinetuneConfig:
    method: str = "lora"
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="adamw", lr=2e-4))
    batch_size: int = 8
    grad_accum: int = 1
    epochs: int = 3
    max_steps: int | None = None
    warmup_steps: int = 10
    schedule: str = "cosine"
    seed: int = 0
    max_length: int = 256
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    eval_every: int = 0
    """Steps between validation runs; 0 = once per epoch."""
    checkpoint_every: int = 20
    patience: int | None = None
    precision: str = "auto"
    threads: int | None = None

    def validate(self) -> None:
        self.optimizer.validate()
        if self.method not in METHODS:
            raise InvalidInputError(f"method must be one of {', '.join(METHODS)}", param="method")
        for name in ("batch_size", "grad_accum", "epochs", "max_length", "checkpoint_every", "lora_r", "lora_alpha"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}", param=name)
        if self.max_steps is not None and self.max_steps < 1:
            raise InvalidInputError(f"max_steps must be positive, got {self.max_steps}", param="max_steps")
        if self.warmup_steps < 0 or self.eval_every < 0:
            raise InvalidInputError("warmup_steps and eval_every must not be negative", param="warmup_steps")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise InvalidInputError("lora_dropout must be in [0, 1)", param="lora_dropout")
        if self.patience is not None and self.patience < 1:
            raise InvalidInputError("patience must be positive", param="patience")
        if self.precision not in PRECISIONS:
            raise InvalidInputError(f"precision must be one of {', '.join(PRECISIONS)}", param="precision")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FinetuneResult:
    steps: int
    epochs_done: float
    train_loss: float
    validation_loss: float | None
    validation_perplexity: float | None
    initial_validation_loss: float | None
    best_validation_loss: float | None
    tokens: int
    tokens_per_second: float
    resumed_from: int | None
    stopped_early: bool
    precision: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def bf16_is_fast() -> bool:
    """bf16 matmuls beat fp32 on CPUs with native bf16 instructions (AVX512-BF16 / AMX); elsewhere they are slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def encode_rows(
    rows: Sequence[dict[str, Any]], tokenizer: Any, chat_template: str | None, max_length: int
) -> list[Example]:
    """Token ids and labels (-100 on tokens that carry no loss) for every row; rows with no loss tokens are dropped."""
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
            labels = [-100] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids) :]
        if any(label != -100 for label in labels[1:]):
            examples.append(Example(list(ids), labels))
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
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def token_loss(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """Sum of the token cross-entropies of a batch and the number of tokens it covers.

    The output projection (vocabulary-sized) runs only at positions that carry a label: for question/answer data
    most positions are prompt, so this skips most of the largest matrix multiply of the step.
    """
    import torch

    targets = batch["labels"][:, 1:]
    keep = targets != -100
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is not None and head is not None:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = head(hidden[:, :-1, :][keep]).float()
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :][keep]
        logits = logits.float()
    loss = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
    return loss, int(keep.sum())


def evaluate_loss(model: Any, examples: Sequence[Example], batch_size: int, pad_id: int) -> float:
    import torch

    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ordered = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    with torch.no_grad():
        for start in range(0, len(ordered), batch_size):
            batch = collate([examples[i] for i in ordered[start : start + batch_size]], pad_id)
            loss, tokens = token_loss(model, batch)
            total += float(loss)
            count += tokens
    model.train(was_training)
    return total / max(count, 1)


# --- checkpoints -------------------------------------------------------------------------------------------------


def _trainable_state(model: Any) -> dict[str, Any]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


# --- training ----------------------------------------------------------------------------------------------------


def load_base(base_dir: Path, config: FinetuneConfig, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        targets = [t for t in LORA_TARGETS if t in present]
        if not targets:
            raise InvalidInputError("the base model has none of the usual attention/MLP projections for LoRA")
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)
    return model


def finetune(
    base_dir: Path,
    train_rows: Sequence[dict[str, Any]],
    validation_rows: Sequence[dict[str, Any]],
    output_dir: Path,
    checkpoints: Checkpoints | Path,
    config: FinetuneConfig,
    *,
    chat_template: str | None = None,
    on_step: StepCallback | None = None,
    log: Callable[[str], None] = print,
) -> FinetuneResult:
    import torch
    from transformers import AutoTokenizer

    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if bf16_is_fast() else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(config.seed)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    train = encode_rows(train_rows, tokenizer, chat_template, config.max_length)
    validation = encode_rows(validation_rows, tokenizer, chat_template, config.max_length) if validation_rows else []
    if not train:
        raise InvalidInputError("no training example has any token to learn from (empty answers?)", param="data")
    lengths = [len(e.input_ids) for e in train]
    loss_tokens = [sum(1 for label in e.labels[1:] if label != -100) for e in train]
    batches_per_epoch = math.ceil(len(train) / config.batch_size)
    steps_per_epoch = max(1, batches_per_epoch // config.grad_accum)
    total = config.max_steps or steps_per_epoch * config.epochs
    eval_every = config.eval_every or steps_per_epoch
    log(
        f"{len(train)} training and {len(validation)} validation examples; {steps_per_epoch} steps per epoch;"
        f" {total} steps; {config.method}; {precision}"
    )

    model = load_base(base_dir, config, dtype)
    model.train()
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], config.optimizer)
    schedule = build_schedule(
        optimizer, warmup_steps=min(config.warmup_steps, total), total_steps=total, kind=config.schedule
    )

    step, best, bad_evals, tokens_done = 0, math.inf, 0, 0
    initial: float | None = None
    resumed_from: int | None = None
    store = Checkpoints.of(checkpoints)
    state = store.load_latest()
    if state is not None:
        model.load_state_dict(state["weights"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, best, bad_evals = int(state["step"]), float(state["best"]), int(state["bad_evals"])
        tokens_done = int(state["tokens"])
        initial = state.get("initial")
        resumed_from = step
        log(f"resumed from the checkpoint of step {step}")
    elif validation:
        initial = evaluate_loss(model, validation, config.batch_size, pad_id)
        log(f"validation loss before training: {initial:.4f} (perplexity {math.exp(initial):.2f})")

    def checkpoint() -> None:
        store.save(
            step,
            {
                "weights": _trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "step": step,
                "best": best,
                "bad_evals": bad_evals,
                "tokens": tokens_done + tokens_this_run,
                "initial": initial,
            },
        )

    started = time.perf_counter()
    tokens_this_run = 0
    last_loss = float("nan")
    validation_loss: float | None = None
    stopped_early = False
    while step < total and not stopped_early:
        epoch, position = divmod(step, steps_per_epoch)
        batches = batch_order(lengths, config.batch_size, config.seed, epoch)
        for index in range(position, steps_per_epoch):
            if step >= total:
                break
            optimizer.zero_grad(set_to_none=True)
            micro = batches[index * config.grad_accum : (index + 1) * config.grad_accum]
            step_tokens = sum(loss_tokens[i] for b in micro for i in b)
            loss_sum = 0.0
            for batch_indices in micro:
                batch = collate([train[i] for i in batch_indices], pad_id)
                loss, _ = token_loss(model, batch)
                (loss / max(step_tokens, 1)).backward()
                loss_sum += float(loss.detach())
                tokens_this_run += int(batch["attention_mask"].sum())
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            last_loss = loss_sum / max(step_tokens, 1)
            metrics = {"loss": last_loss, "lr": float(schedule.get_last_lr()[0]), "epoch": step / steps_per_epoch}
            if validation and (step % eval_every == 0 or step == total):
                validation_loss = evaluate_loss(model, validation, config.batch_size, pad_id)
                metrics.update(val_loss=validation_loss, val_perplexity=math.exp(validation_loss))
                if validation_loss < best - 1e-4:
                    best, bad_evals = validation_loss, 0
                else:
                    bad_evals += 1
                    if config.patience is not None and bad_evals >= config.patience:
                        stopped_early = True
            elapsed = time.perf_counter() - started
            metrics["tokens_per_second"] = tokens_this_run / elapsed if elapsed > 0 else 0.0
            stop = on_step(step, total, metrics) if on_step else False
            if step % config.checkpoint_every == 0 or stop or stopped_early:
                checkpoint()
            if stop:
                raise TrainingStopped(f"stopped at step {step}")
            if stopped_early:
                log(f"early stop at step {step}: no validation improvement in {config.patience} evaluations")
                break
    elapsed = time.perf_counter() - started
    if validation and validation_loss is None:
        validation_loss = evaluate_loss(model, validation, config.batch_size, pad_id)
    make_private_dir(output_dir)
    if config.method == "lora":
        model.save_pretrained(output_dir)
    else:
        model.save_pretrained(output_dir, safe_serialization=True)
        tokenizer.save_pretrained(output_dir)
    return FinetuneResult(
        steps=step,
        epochs_done=step / steps_per_epoch,
        train_loss=last_loss,
        validation_loss=validation_loss,
        validation_perplexity=math.exp(validation_loss) if validation_loss is not None else None,
        initial_validation_loss=initial,
        best_validation_loss=best if best < math.inf else None,
        tokens=tokens_done + tokens_this_run,
        tokens_per_second=tokens_this_run / elapsed if elapsed > 0 else 0.0,
        resumed_from=resumed_from,
        stopped_early=stopped_early,
        precision=precision,
    )
