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
  :mod:`llmos.training.optim`) with the one training loop, :class:`~llmos.training.loop.TrainingLoop`, and
  :class:`Distillation` as its loss hook: rows encoded as :mod:`llmos.training.batches` says, length-grouped seeded
  batches, atomic checkpoints (``checkpoint_every`` steps and when stopped) and resume from the newest checkpoint
  that loads, through :class:`~llmos.training.checkpoints.Checkpoints` (``checkpoints``: one, or a
  directory for plaintext ones; private files, encrypted when it holds a cipher). ``on_step(step, total, metrics)``
  gets ``loss``, ``kl``, ``ce``, ``lr``, ``epoch``, ``tokens_per_second`` (training time only; validation excluded)
  and ``val_*`` after each validation; it returns True to stop (a checkpoint is written and
  :class:`~llmos.training.loop.TrainingStopped` raised). The result directory is a full Hugging Face checkpoint
  with the student's tokenizer files.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmos.errors import InvalidInputError, InvalidModelFileError
from llmos.training.batches import Example
from llmos.training.checkpoints import Checkpoints, make_private_dir
from llmos.training.config import TrainingConfig, begin, encode_examples
from llmos.training.loop import (
    StepCallback,
    TrainingLoop,
    TrainingStopped,
    count_parameters,
    position_logits,
    shown,
)
from llmos.training.optim import OptimizerConfig

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)  # fmt: skip


@dataclass
class DistillConfig(TrainingConfig):
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="adamw", lr=1e-4))
    epochs: int = 1
    checkpoint_every: int = 50
    temperature: float = 2.0
    alpha: float = 0.5

    def validate(self) -> None:
        if not isinstance(self.temperature, int | float) or not math.isfinite(self.temperature):
            raise InvalidInputError(f"temperature must be a number, got {self.temperature!r}", param="temperature")
        if self.temperature <= 0:
            raise InvalidInputError(f"temperature must be greater than 0, got {self.temperature}", param="temperature")
        if not isinstance(self.alpha, int | float) or not 0.0 <= self.alpha <= 1.0:
            raise InvalidInputError(f"alpha must be in [0, 1], got {self.alpha!r}", param="alpha")
        super().validate()


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


def batch_parts(student: Any, teacher: Any, batch: dict[str, Any], temperature: float) -> LossParts:
    import torch

    keep = batch["attention_mask"][:, 1:].bool()  # every position whose next token is real
    with torch.no_grad():
        teacher_logits = position_logits(teacher, batch, keep)
    student_logits = position_logits(student, batch, keep)
    return loss_parts(student_logits, teacher_logits, batch["labels"][:, 1:][keep], temperature)


class Distillation:
    """The loss hook of :class:`~llmos.training.loop.TrainingLoop` for distillation: terms ``kl`` (every real next-token
    position) and ``ce`` (labelled positions), combined as the module docstring says."""

    terms: tuple[str, ...] = ("kl", "ce")

    def __init__(self, teacher: Any, temperature: float, alpha: float) -> None:
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha

    def counts(self, examples: Sequence[Example]) -> dict[str, int]:
        return {"kl": sum(len(e.input_ids) - 1 for e in examples), "ce": sum(e.loss_tokens for e in examples)}

    def sums(self, model: Any, batch: dict[str, Any]) -> tuple[Any, ...]:
        parts = batch_parts(model, self.teacher, batch, self.temperature)
        return parts.kl_sum, parts.ce_sum

    def combine(self, means: dict[str, Any]) -> Any:
        return self.alpha * self.temperature**2 * means["kl"] + (1.0 - self.alpha) * means["ce"]


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config.validate()
    check_same_tokenizer(teacher_dir, student_dir)
    precision, dtype = begin(config)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    examples = encode_examples(tokenizer, train_rows, validation_rows, chat_template, config.max_length)
    plan = config.plan(len(examples.train))

    teacher: Any = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype)
    teacher.eval()
    teacher.requires_grad_(False)
    student: Any = AutoModelForCausalLM.from_pretrained(student_dir, dtype=dtype)
    student.train()
    log(
        f"{len(examples.train)} training and {len(examples.validation)} validation examples; {plan.steps_per_epoch}"
        f" steps per epoch; {plan.total_steps} steps; teacher {count_parameters(teacher):,} and student"
        f" {count_parameters(student):,} parameters; T={config.temperature} alpha={config.alpha}; {precision}"
    )
    optimizer, schedule = config.optimizer_and_schedule(student.parameters(), plan.total_steps)
    loop = TrainingLoop(
        student,
        optimizer,
        schedule,
        Distillation(teacher, config.temperature, config.alpha),
        plan,
        checkpoints=Checkpoints.of(checkpoints),
        on_step=on_step,
        log=log,
    )
    order = examples.order(config.batch_size, config.seed)
    outcome = loop.run(examples.train, examples.validation, order, examples.pad_id)
    if outcome.stopped:
        raise TrainingStopped(f"stopped at step {outcome.steps}")
    if outcome.validation is not None:
        log(f"after distillation: {shown(outcome.validation)}")
    make_private_dir(output_dir)
    student.save_pretrained(output_dir, safe_serialization=True)
    copy_tokenizer(student_dir, output_dir)
    return DistillResult(
        steps=outcome.steps,
        epochs_done=outcome.epochs_done,
        train_loss=outcome.train["loss"],
        train_kl=outcome.train.get("kl", math.nan),
        train_ce=outcome.train.get("ce", math.nan),
        initial_validation=outcome.initial,
        validation=outcome.validation,
        tokens=outcome.tokens,
        tokens_per_second=outcome.tokens_per_second,
        resumed_from=outcome.resumed_from,
        student_parameters=count_parameters(student),
        teacher_parameters=count_parameters(teacher),
        precision=precision,
    )
