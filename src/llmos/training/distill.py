"""Knowledge distillation: train a student causal LM on a teacher's soft targets plus the hard labels.

Contract:

* Loss (:func:`distillation_loss`): ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
  + (1 - alpha) * CE(student, labels)``. The KL term is averaged over every real next-token position (prompt and
  answer alike: the teacher's distribution is informative everywhere); the cross-entropy over the positions that
  carry a label (answers for prompt/completion and chat rows, every token for text rows), exactly as
  :mod:`llmos.training.finetune` does. With gradient accumulation both are token-weighted over the whole step.
* The teacher runs in eval mode under ``no_grad``; it and the student must share a tokenizer
  (:func:`check_same_tokenizer` compares the vocabularies and the output sizes) and raises
  :class:`~llmos.errors.InvalidInputError` "teacher and student use different tokenizers ..." otherwise.
* :func:`build_student` writes a new, randomly initialised student (deterministic for a seed) with the teacher's
  architecture, tokenizer and chat template but fewer layers and / or a narrower hidden size.
* :func:`distill` trains a Hugging Face student directory (full fine-tune, AdamW by default, schedule from
  :mod:`llmos.training.optim`), reusing the fine-tuning machinery: row encoding with the chat template, length-
  grouped seeded batches, atomic checkpoints (``checkpoint_every`` steps and when stopped) and resume from the newest
  checkpoint that loads, through :class:`~llmos.training.checkpoints.Checkpoints` (``checkpoints``: one, or a
  directory for plaintext ones; private files, encrypted when it holds a cipher). ``on_step(step, total, metrics)``
  gets ``loss``, ``kl``, ``ce``, ``lr``, ``epoch``, ``tokens_per_second`` (training time only; validation excluded)
  and ``val_*`` after each validation; it returns True to stop (a checkpoint is written and
  :class:`~llmos.training.finetune.TrainingStopped` raised). The result directory is a full Hugging Face checkpoint
  with the student's tokenizer files.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmos.errors import InvalidInputError, InvalidModelFileError
from llmos.training.checkpoints import Checkpoints, make_private_dir
from llmos.training.finetune import (
    PRECISIONS,
    Example,
    StepCallback,
    TrainingStopped,
    batch_order,
    bf16_is_fast,
    collate,
    encode_rows,
)
from llmos.training.optim import OptimizerConfig, build_optimizer, build_schedule

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)  # fmt: skip


@dataclass
class DistillConfig:
    temperature: float = 2.0
    alpha: float = 0.5
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="adamw", lr=1e-4))
    batch_size: int = 8
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None
    warmup_steps: int = 10
    schedule: str = "cosine"
    seed: int = 0
    max_length: int = 256
    eval_every: int = 0
    """Steps between validation runs; 0 = once per epoch."""
    checkpoint_every: int = 50
    precision: str = "auto"
    threads: int | None = None

    def validate(self) -> None:
        self.optimizer.validate()
        if not isinstance(self.temperature, int | float) or not math.isfinite(self.temperature):
            raise InvalidInputError(f"temperature must be a number, got {self.temperature!r}", param="temperature")
        if self.temperature <= 0:
            raise InvalidInputError(f"temperature must be greater than 0, got {self.temperature}", param="temperature")
        if not isinstance(self.alpha, int | float) or not 0.0 <= self.alpha <= 1.0:
            raise InvalidInputError(f"alpha must be in [0, 1], got {self.alpha!r}", param="alpha")
        for name in ("batch_size", "grad_accum", "epochs", "max_length", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}", param=name)
        if self.max_steps is not None and self.max_steps < 1:
            raise InvalidInputError(f"max_steps must be positive, got {self.max_steps}", param="max_steps")
        if self.warmup_steps < 0 or self.eval_every < 0:
            raise InvalidInputError("warmup_steps and eval_every must not be negative", param="warmup_steps")
        if self.precision not in PRECISIONS:
            raise InvalidInputError(f"precision must be one of {', '.join(PRECISIONS)}", param="precision")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DistillResult:
    steps: int
    epochs_done: float
    train_loss: float
    train_kl: float
    train_ce: float
    initial_validation: dict[str, float] | None
    validation: dict[str, float] | None
    tokens: int
    tokens_per_second: float
    resumed_from: int | None
    student_parameters: int
    teacher_parameters: int
    precision: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the loss ----------------------------------------------------------------------------------------------------


@dataclass
class LossParts:
    """Sums over positions (tensors, so the loss can be built and backpropagated) and the position counts."""

    kl_sum: Any
    kl_tokens: int
    ce_sum: Any
    ce_tokens: int


def loss_parts(student_logits: Any, teacher_logits: Any, targets: Any, temperature: float) -> LossParts:
    """KL and CE sums over ``N`` positions: logits ``[N, V]``, ``targets`` ``[N]`` (-100 where no label)."""
    import torch
    import torch.nn.functional as F

    if student_logits.shape != teacher_logits.shape:
        raise InvalidInputError(
            f"teacher and student use different tokenizers (output sizes {teacher_logits.shape[-1]} and"
            f" {student_logits.shape[-1]})"
        )
    student = student_logits.float()
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl_sum = F.kl_div(log_student, log_teacher, log_target=True, reduction="sum")
    keep = targets != -100
    if bool(keep.any()):
        ce_sum = F.cross_entropy(student[keep], targets[keep], reduction="sum")
    else:
        ce_sum = torch.zeros((), dtype=student.dtype, device=student.device)
    return LossParts(kl_sum, int(student.shape[0]), ce_sum, int(keep.sum()))


def combine(parts: LossParts, temperature: float, alpha: float) -> Any:
    """``alpha * T^2 * mean KL + (1 - alpha) * mean CE``, each mean over its own positions."""
    kl = parts.kl_sum / max(parts.kl_tokens, 1)
    ce = parts.ce_sum / max(parts.ce_tokens, 1)
    return alpha * temperature**2 * kl + (1.0 - alpha) * ce


def distillation_loss(
    student_logits: Any, teacher_logits: Any, targets: Any, *, temperature: float = 2.0, alpha: float = 0.5
) -> Any:
    """The distillation loss of one batch of positions (see the module docstring)."""
    return combine(loss_parts(student_logits, teacher_logits, targets, temperature), temperature, alpha)


def position_logits(model: Any, batch: dict[str, Any], keep: Any) -> Any:
    """Logits ``[N, V]`` at the positions ``keep`` (``[B, T-1]``) only: the vocabulary projection is the largest
    matrix multiply, and padding positions need none."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is not None and head is not None:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return head(hidden[:, :-1, :][keep])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, :-1, :][keep]


def batch_parts(student: Any, teacher: Any, batch: dict[str, Any], temperature: float) -> LossParts:
    import torch

    keep = batch["attention_mask"][:, 1:].bool()  # every position whose next token is real
    with torch.no_grad():
        teacher_logits = position_logits(teacher, batch, keep)
    student_logits = position_logits(student, batch, keep)
    return loss_parts(student_logits, teacher_logits, batch["labels"][:, 1:][keep], temperature)


def evaluate(
    student: Any, teacher: Any, examples: Sequence[Example], config: DistillConfig, pad_id: int
) -> dict[str, float]:
    """Validation loss, KL, CE and perplexity (from the CE) of the student against the teacher."""
    import torch

    was_training = student.training
    student.eval()
    kl = ce = 0.0
    kl_tokens = ce_tokens = 0
    ordered = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    with torch.no_grad():
        for start in range(0, len(ordered), config.batch_size):
            batch = collate([examples[i] for i in ordered[start : start + config.batch_size]], pad_id)
            parts = batch_parts(student, teacher, batch, config.temperature)
            kl += float(parts.kl_sum)
            ce += float(parts.ce_sum)
            kl_tokens += parts.kl_tokens
            ce_tokens += parts.ce_tokens
    student.train(was_training)
    mean_kl, mean_ce = kl / max(kl_tokens, 1), ce / max(ce_tokens, 1)
    loss = config.alpha * config.temperature**2 * mean_kl + (1 - config.alpha) * mean_ce
    return {"loss": loss, "kl": mean_kl, "ce": mean_ce, "perplexity": math.exp(min(mean_ce, 700.0))}


# --- tokenizers and students --------------------------------------------------------------------------------------


def _config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidModelFileError(f"{directory}: no readable config.json ({type(exc).__name__})") from exc
    if not isinstance(config, dict):
        raise InvalidModelFileError(f"{directory}: config.json is not a JSON object")
    return config


def check_same_tokenizer(teacher_dir: Path, student_dir: Path) -> None:
    """Refuse a teacher and a student whose vocabularies (or output sizes) differ: logit distillation needs one."""
    from transformers import AutoTokenizer

    teacher_vocab = AutoTokenizer.from_pretrained(teacher_dir).get_vocab()
    student_vocab = AutoTokenizer.from_pretrained(student_dir).get_vocab()
    if teacher_vocab != student_vocab:
        differ = len(set(teacher_vocab.items()) ^ set(student_vocab.items()))
        raise InvalidInputError(
            f"teacher and student use different tokenizers ({len(teacher_vocab)} and {len(student_vocab)} tokens,"
            f" {differ} entries differ); logit distillation needs a shared vocabulary",
            param="student",
        )
    sizes = (_config(teacher_dir).get("vocab_size"), _config(student_dir).get("vocab_size"))
    if sizes[0] != sizes[1]:
        raise InvalidInputError(
            f"teacher and student use different tokenizers (output layers of {sizes[0]} and {sizes[1]} tokens)",
            param="student",
        )


def student_shape(teacher: dict[str, Any], layers: int | None, hidden: int | None) -> dict[str, int]:
    """The config fields of a smaller student of the teacher's architecture (head size kept)."""
    t_layers, t_hidden = int(teacher["num_hidden_layers"]), int(teacher["hidden_size"])
    t_heads = int(teacher["num_attention_heads"])
    t_kv = int(teacher.get("num_key_value_heads") or t_heads)
    head_dim = int(teacher.get("head_dim") or t_hidden // t_heads)
    layers = t_layers if layers is None else layers
    hidden = t_hidden if hidden is None else hidden
    if not isinstance(layers, int) or not 1 <= layers <= 1024:
        raise InvalidInputError(f"--student-layers must be between 1 and 1024, got {layers}", param="student_layers")
    if not isinstance(hidden, int) or hidden < head_dim or hidden % head_dim:
        raise InvalidInputError(
            f"--student-hidden must be a positive multiple of the teacher's head size {head_dim}, got {hidden}",
            param="student_hidden",
        )
    heads = hidden // head_dim
    wanted_kv = max(1, heads * t_kv // t_heads)
    kv = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= wanted_kv)
    t_inter = int(teacher.get("intermediate_size") or 4 * t_hidden)
    intermediate = max(head_dim, round(t_inter * hidden / t_hidden / head_dim) * head_dim)
    return {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "intermediate_size": intermediate,
    }


def build_student(teacher_dir: Path, target: Path, *, layers: int | None, hidden: int | None, seed: int = 0) -> Path:
    """A randomly initialised student with the teacher's architecture and tokenizer, written to ``target``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    teacher = _config(teacher_dir)
    shape = student_shape(teacher, layers, hidden)
    config = AutoConfig.from_pretrained(teacher_dir)
    for key, value in shape.items():
        setattr(config, key, value)
    devices = torch.random.fork_rng(devices=[])
    with devices:
        torch.manual_seed(seed)
        model: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    shutil.rmtree(target, ignore_errors=True)
    make_private_dir(target)
    model.save_pretrained(target, safe_serialization=True)
    copy_tokenizer(teacher_dir, target)
    return target


def copy_tokenizer(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and not (target / name).exists():
            shutil.copyfile(source / name, target / name)


# --- training -----------------------------------------------------------------------------------------------------


def _parameters(model: Any) -> int:
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def distill(
    teacher_dir: Path,
    student_dir: Path,
    train_rows: Sequence[dict[str, Any]],
    validation_rows: Sequence[dict[str, Any]],
    output_dir: Path,
    checkpoints: Checkpoints | Path,
    config: DistillConfig,
    *,
    chat_template: str | None = None,
    on_step: StepCallback | None = None,
    log: Callable[[str], None] = print,
) -> DistillResult:
    """Distil ``teacher_dir`` into ``student_dir`` on the rows and write the student into ``output_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config.validate()
    check_same_tokenizer(teacher_dir, student_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if bf16_is_fast() else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(config.seed)

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    train = encode_rows(train_rows, tokenizer, chat_template, config.max_length)
    validation = encode_rows(validation_rows, tokenizer, chat_template, config.max_length) if validation_rows else []
    if not train:
        raise InvalidInputError("no training example has any token to learn from (empty answers?)", param="data")
    lengths = [len(e.input_ids) for e in train]
    batches_per_epoch = math.ceil(len(train) / config.batch_size)
    steps_per_epoch = max(1, batches_per_epoch // config.grad_accum)
    total = config.max_steps or steps_per_epoch * config.epochs
    eval_every = config.eval_every or steps_per_epoch

    teacher: Any = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype)
    teacher.eval()
    teacher.requires_grad_(False)
    student: Any = AutoModelForCausalLM.from_pretrained(student_dir, dtype=dtype)
    student.train()
    log(
        f"{len(train)} training and {len(validation)} validation examples; {steps_per_epoch} steps per epoch;"
        f" {total} steps; teacher {_parameters(teacher):,} and student {_parameters(student):,} parameters;"
        f" T={config.temperature} alpha={config.alpha}; {precision}"
    )
    optimizer = build_optimizer(student.parameters(), config.optimizer)
    schedule = build_schedule(
        optimizer, warmup_steps=min(config.warmup_steps, total), total_steps=total, kind=config.schedule
    )

    step, tokens_done = 0, 0
    initial: dict[str, float] | None = None
    resumed_from: int | None = None
    store = Checkpoints.of(checkpoints)
    state = store.load_latest()
    if state is not None:
        student.load_state_dict(state["weights"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, tokens_done = int(state["step"]), int(state["tokens"])
        initial = state.get("initial")
        resumed_from = step
        log(f"resumed from the checkpoint of step {step}")
    elif validation:
        initial = evaluate(student, teacher, validation, config, pad_id)
        log(f"before distillation: {_shown(initial)}")

    tokens_this_run = 0

    def checkpoint() -> None:
        weights = {name: p.detach().clone() for name, p in student.named_parameters()}
        store.save(
            step,
            {
                "weights": weights,
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "step": step,
                "tokens": tokens_done + tokens_this_run,
                "initial": initial,
            },
        )

    started = time.perf_counter()
    evaluating = 0.0  # seconds spent on validation, left out of the training speed
    last = {"loss": float("nan"), "kl": float("nan"), "ce": float("nan")}
    measured: dict[str, float] | None = None
    while step < total:
        epoch, position = divmod(step, steps_per_epoch)
        batches = batch_order(lengths, config.batch_size, config.seed, epoch)
        for index in range(position, steps_per_epoch):
            if step >= total:
                break
            optimizer.zero_grad(set_to_none=True)
            micro = [
                collate([train[i] for i in b], pad_id)
                for b in batches[index * config.grad_accum :][: config.grad_accum]
            ]
            kl_tokens = sum(int(b["attention_mask"][:, 1:].sum()) for b in micro)
            ce_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
            kl_sum = ce_sum = 0.0
            for batch in micro:
                parts = batch_parts(student, teacher, batch, config.temperature)
                scaled = LossParts(parts.kl_sum, kl_tokens, parts.ce_sum, ce_tokens)  # step-wide token means
                combine(scaled, config.temperature, config.alpha).backward()
                kl_sum += float(parts.kl_sum.detach())
                ce_sum += float(parts.ce_sum.detach())
                tokens_this_run += int(batch["attention_mask"].sum())
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            kl, ce = kl_sum / max(kl_tokens, 1), ce_sum / max(ce_tokens, 1)
            last = {"loss": config.alpha * config.temperature**2 * kl + (1 - config.alpha) * ce, "kl": kl, "ce": ce}
            metrics = {**last, "lr": float(schedule.get_last_lr()[0]), "epoch": step / steps_per_epoch}
            if validation and (step % eval_every == 0 or step == total):
                evaluated = time.perf_counter()
                measured = evaluate(student, teacher, validation, config, pad_id)
                evaluating += time.perf_counter() - evaluated
                metrics.update({f"val_{key}": value for key, value in measured.items()})
            elapsed = time.perf_counter() - started - evaluating
            metrics["tokens_per_second"] = tokens_this_run / elapsed if elapsed > 0 else 0.0
            stop = on_step(step, total, metrics) if on_step else False
            if step % config.checkpoint_every == 0 or stop:
                checkpoint()
            if stop:
                raise TrainingStopped(f"stopped at step {step}")
    elapsed = time.perf_counter() - started - evaluating
    if validation and measured is None:
        measured = evaluate(student, teacher, validation, config, pad_id)
    if measured is not None:
        log(f"after distillation: {_shown(measured)}")
    make_private_dir(output_dir)
    student.save_pretrained(output_dir, safe_serialization=True)
    copy_tokenizer(student_dir, output_dir)
    return DistillResult(
        steps=step,
        epochs_done=step / steps_per_epoch,
        train_loss=last["loss"],
        train_kl=last["kl"],
        train_ce=last["ce"],
        initial_validation=initial,
        validation=measured,
        tokens=tokens_done + tokens_this_run,
        tokens_per_second=tokens_this_run / elapsed if elapsed > 0 else 0.0,
        resumed_from=resumed_from,
        student_parameters=_parameters(student),
        teacher_parameters=_parameters(teacher),
        precision=precision,
    )


def _shown(values: dict[str, float]) -> str:
    return " ".join(f"{key}={value:.4f}" for key, value in values.items())
