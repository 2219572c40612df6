"""Fine-tuning a Hugging Face causal LM (full or LoRA) on dataset rows, with checkpoints that make it resumable.

Contract: :func:`finetune` trains ``base_dir`` (a Hugging Face checkpoint directory) on ``train_rows`` and writes the
result into ``output_dir``: a peft LoRA adapter directory (``method="lora"``) or a full Hugging Face checkpoint
(``method="full"``, tokenizer included). It returns a :class:`FinetuneResult` with the final and best validation loss
and perplexity, tokens trained on and tokens per second.

* Rows become examples as :mod:`llmos.training.batches` says (chat template, loss on the answers only, length-grouped
  batches in an order that depends only on the seed and the epoch).
* :func:`prepare` builds the run (tokenizer, examples, base with LoRA adapters, optimizer and schedule from
  :mod:`llmos.training.optim`, the :class:`~llmos.training.loop.LoopPlan`); :mod:`llmos.distributed.training` uses it
  on every Ray worker. The steps are :class:`~llmos.training.loop.TrainingLoop`'s with the cross-entropy objective:
  ``grad_accum`` micro-batches per step, validation every ``eval_every`` steps (0: once per epoch) and at the end,
  early stop after ``patience`` validations without improvement, checkpoints every ``checkpoint_every`` steps and
  when stopped through :class:`~llmos.training.checkpoints.Checkpoints` (``checkpoints``: one, or a directory for
  plaintext ones; atomic, private, encrypted when it holds a cipher; the two newest kept; weights, optimizer,
  schedule, counters and RNG state). A run started with the same arguments and an existing checkpoint continues from
  the newest one that loads, so an interrupted job ends where an uninterrupted one would. A failed write (disk full)
  raises :class:`~llmos.errors.StorageError` and leaves earlier checkpoints intact. The output directory is private.
* ``on_step(step, total, metrics)`` is called after every optimizer step; it returns True to stop (cancellation):
  a checkpoint is written and :class:`~llmos.training.loop.TrainingStopped` is raised.
* ``device`` (a setting such as ``Settings.torch_device``, or a ``torch.device``) picks where the run trains, by
  :func:`llmos.engine.torch_device.resolve_device`: ``auto`` is the first CUDA GPU when torch sees one, else the CPU.
  Checkpoints hold CPU tensors for the weights and load with ``map_location="cpu"``, so a run checkpointed on a GPU
  resumes on the CPU and the other way round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmos.errors import InvalidInputError
from llmos.training.checkpoints import Checkpoints, CheckpointStore, make_private_dir
from llmos.training.config import Encoded, TrainingConfig, begin, encode_examples
from llmos.training.loop import (
    Collective,
    CrossEntropy,
    LoopOutcome,
    LoopPlan,
    StepCallback,
    TrainingLoop,
    TrainingStopped,
)

METHODS = ("lora", "full")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
__all__ = ["FinetuneConfig", "FinetuneResult", "TrainingStopped", "finetune", "prepare"]


@dataclass
class FinetuneConfig(TrainingConfig):
    method: str = "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.method not in METHODS:
            raise InvalidInputError(f"method must be one of {', '.join(METHODS)}", param="method")
        for name in ("lora_r", "lora_alpha"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}", param=name)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise InvalidInputError("lora_dropout must be in [0, 1)", param="lora_dropout")


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


@dataclass
class FinetuneSetup:
    """Everything a fine-tuning run needs before its first step, built the same way in one process and on Ray."""

    config: FinetuneConfig
    precision: str
    tokenizer: Any
    examples: Encoded
    plan: LoopPlan
    model: Any
    optimizer: Any
    schedule: Any
    device: Any = None
    """The ``torch.device`` the model is on."""

    def describe(self) -> str:
        plan, examples = self.plan, self.examples
        return (
            f"{len(examples.train)} training and {len(examples.validation)} validation examples;"
            f" {plan.steps_per_epoch} steps per epoch; {plan.total_steps} steps; {self.config.method}; {self.precision}"
            f" on {self.device}"
        )

    def run(
        self,
        checkpoints: CheckpointStore,
        *,
        collective: Collective | None = None,
        on_step: StepCallback | None = None,
        log: Callable[[str], None] = print,
    ) -> LoopOutcome:
        """The training loop with the cross-entropy objective, from the newest checkpoint to the end or a stop."""
        loop = TrainingLoop(
            self.model,
            self.optimizer,
            self.schedule,
            CrossEntropy(),
            self.plan,
            collective=collective or Collective(self.device),
            checkpoints=checkpoints,
            on_step=on_step,
            log=log,
        )
        examples = self.examples
        order = examples.order(self.config.batch_size, self.config.seed)
        return loop.run(examples.train, examples.validation, order, examples.pad_id)

    def save(self, output_dir: Path) -> None:
        """The adapter (LoRA) or the full checkpoint with its tokenizer, in a private directory."""
        make_private_dir(output_dir)
        if self.config.method == "lora":
            self.model.save_pretrained(output_dir)
        else:
            self.model.save_pretrained(output_dir, safe_serialization=True)
            self.tokenizer.save_pretrained(output_dir)

    def result(self, outcome: LoopOutcome) -> FinetuneResult:
        validation = outcome.validation["loss"] if outcome.validation is not None else None
        return FinetuneResult(
            steps=outcome.steps,
            epochs_done=outcome.epochs_done,
            train_loss=outcome.train["loss"],
            validation_loss=validation,
            validation_perplexity=math.exp(validation) if validation is not None else None,
            initial_validation_loss=outcome.initial["loss"] if outcome.initial is not None else None,
            best_validation_loss=outcome.best_loss,
            tokens=outcome.tokens,
            tokens_per_second=outcome.tokens_per_second,
            resumed_from=outcome.resumed_from,
            stopped_early=outcome.stopped_early,
            precision=self.precision,
        )


def prepare(
    base_dir: Path,
    train_rows: Sequence[dict[str, Any]],
    validation_rows: Sequence[dict[str, Any]],
    config: FinetuneConfig,
    *,
    chat_template: str | None = None,
    device: Any = "auto",
) -> FinetuneSetup:
    """Seed, encode the rows, load the base (with LoRA adapters) on ``device`` and build the optimizer and
    schedule."""
    from transformers import AutoTokenizer

    from llmos.engine.torch_device import resolve_device

    config.validate()
    device = resolve_device(device)
    precision, dtype = begin(config, device)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    encoded = encode_examples(tokenizer, train_rows, validation_rows, chat_template, config.max_length)
    plan = config.plan(len(encoded.train))
    model = load_base(base_dir, config, dtype)
    if device.type != "cpu":
        model = model.to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = config.optimizer_and_schedule(trainable, plan.total_steps)
    return FinetuneSetup(config, precision, tokenizer, encoded, plan, model, optimizer, schedule, device)


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
    device: Any = "auto",
) -> FinetuneResult:
    """Fine-tune ``base_dir`` on the rows in this process (on ``device``) and write the result into
    ``output_dir``."""
    setup = prepare(base_dir, train_rows, validation_rows, config, chat_template=chat_template, device=device)
    log(setup.describe())
    outcome = setup.run(Checkpoints.of(checkpoints), on_step=on_step, log=log)
    if outcome.stopped:
        raise TrainingStopped(f"stopped at step {outcome.steps}")
    setup.save(output_dir)
    return setup.result(outcome)
