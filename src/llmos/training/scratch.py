"""Small language models trained from scratch, with a Keras-style ``create_model`` / ``fit`` / ``evaluate`` API.

Contract: :func:`create_model` builds a randomly initialised :class:`ScratchModel` (deterministic for a given
``seed``) of one of :data:`ARCHS`:

- ``gpt``: a transformers ``LlamaForCausalLM`` from a small ``LlamaConfig`` with tied word embeddings. Its saved
  directory is an ordinary Hugging Face checkpoint (``config.json``, ``model.safetensors``, ``generation_config.json``,
  tokenizer files) that ``AutoModelForCausalLM`` and ``AutoTokenizer`` load.
- ``lstm``: ``Embedding -> LSTM(layers) -> Linear``, as in the classic word-language-model tutorials, saved as
  ``config.json`` (``"architectures": ["LlmosLSTM"]``, ``"model_type": "llmos-lstm"`` and its sizes),
  ``model.safetensors`` and the tokenizer files. Only :func:`load_scratch_model` loads it.

Without a tokenizer, one is built with :func:`llmos.training.charset.build_char_tokenizer` from ``texts``. Training
data is a list of strings or of llmos dataset rows (``{"text"}``, ``{"prompt", "completion"}`` or ``{"messages"}``);
each text becomes ``<bos> text <eos>``, split into windows of at most ``context`` tokens that overlap by one token
(so every next-token pair is learnt), and batches are right-padded with ``<pad>`` whose labels are ``-100`` (ignored
in the loss). Losses are token-weighted means of the next-token cross entropy. Training is deterministic for a
given ``seed``: the data order comes from a seeded ``torch.Generator`` and dropout runs under a forked, seeded torch
RNG, so global random state is left as it was. Gradients are clipped to norm 1.0; a non-finite loss stops training
with an error instead of corrupting the weights further. Bad arguments raise
:class:`~llmos.errors.InvalidInputError` with ``param`` naming the argument; unreadable directories raise
:class:`~llmos.errors.InvalidModelFileError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llmos.errors import InvalidInputError, InvalidModelFileError
from llmos.training.batches import Example
from llmos.training.charset import build_char_tokenizer
from llmos.training.loop import Collective, CrossEntropy, LoopPlan, TrainingLoop, evaluate
from llmos.training.optim import SCHEDULES, OptimizerConfig, build_optimizer, build_schedule

ARCHS = ("gpt", "lstm")
LSTM_ARCHITECTURE = "LlmosLSTM"
LSTM_MODEL_TYPE = "llmos-lstm"
LLAMA_MODEL_TYPE = "llama"
IGNORE_INDEX = -100
MAX_PARAMETERS = 2_000_000_000
MAX_CONTEXT = 1 << 20
MAX_GENERATE = 1 << 20
TOP_K = 10
GRAD_CLIP = 1.0
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


# --- validation helpers ---------------------------------------------------------------------------------------------


def _int(value: object, param: str, *, minimum: int, maximum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInputError(f"{param} must be an integer, got {value!r}", param=param)
    if value < minimum:
        raise InvalidInputError(f"{param} must be at least {minimum}, got {value}", param=param)
    if maximum is not None and value > maximum:
        raise InvalidInputError(f"{param} must be at most {maximum}, got {value}", param=param)
    return value


def _real(value: object, param: str, *, minimum: float, below: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInputError(f"{param} must be a finite number, got {value!r}", param=param)
    if value < minimum or (below is not None and value >= below):
        bound = f"in [{minimum}, {below})" if below is not None else f"at least {minimum}"
        raise InvalidInputError(f"{param} must be {bound}, got {value}", param=param)
    return float(value)


def row_text(row: object, *, param: str = "data", index: int = 0) -> str:
    """The training text of one item: a string, or a row's ``text``, ``prompt + completion`` or joined messages."""
    if isinstance(row, str):
        return row
    where = f"{param}[{index}]"
    if not isinstance(row, Mapping):
        raise InvalidInputError(f"{where} must be a string or a row dict, got {type(row).__name__}", param=param)
    text = row.get("text")
    if isinstance(text, str):
        return text
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt + completion
    messages = row.get("messages")
    if isinstance(messages, list) and messages:
        parts: list[str] = []
        for message in messages:
            content = message.get("content") if isinstance(message, Mapping) else None
            if not isinstance(content, str):
                raise InvalidInputError(f"{where} has a message without string content", param=param)
            parts.append(content)
        return "\n".join(parts)
    raise InvalidInputError(
        f"{where} has no string 'text', 'prompt' and 'completion', or non-empty 'messages' field", param=param
    )


def _as_text(decoded: str | list[str]) -> str:
    return decoded if isinstance(decoded, str) else "".join(decoded)


def _texts(data: object, param: str) -> list[str]:
    if isinstance(data, str | bytes | Mapping) or not isinstance(data, Iterable):
        raise InvalidInputError(f"{param} must be a list of strings or row dicts", param=param)
    texts = [row_text(row, param=param, index=index) for index, row in enumerate(data)]
    if not texts:
        raise InvalidInputError(f"{param} is empty; give at least one text", param=param)
    return texts


# --- the LSTM language model ----------------------------------------------------------------------------------------


class LSTMLanguageModel(nn.Module):
    """``Embedding -> dropout -> LSTM -> dropout -> Linear``; ``forward(input_ids)`` returns logits ``[B, T, V]``."""

    def __init__(self, *, vocab_size: int, d_model: int, hidden_size: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(
            d_model, hidden_size, num_layers=num_layers, dropout=dropout if num_layers > 1 else 0.0, batch_first=True
        )
        self.head = nn.Linear(hidden_size, vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.head.weight, -0.1, 0.1)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.dropout(self.embedding(input_ids)))
        logits: torch.Tensor = self.head(self.dropout(hidden))
        return logits


# --- the model wrapper ----------------------------------------------------------------------------------------------


class ScratchModel:
    """A causal language model plus its tokenizer, with ``fit``, ``evaluate``, ``predict`` and ``generate_text``."""

    def __init__(
        self,
        module: nn.Module,
        tokenizer: PreTrainedTokenizerFast,
        *,
        arch: str,
        context: int,
        lstm_config: Mapping[str, Any] | None = None,
    ) -> None:
        if arch not in ARCHS:
            raise InvalidInputError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}", param="arch")
        self._module = module
        self._tokenizer = tokenizer
        self._arch = arch
        self._context = context
        self._lstm_config = dict(lstm_config or {})
        eos = tokenizer.eos_token_id
        if not isinstance(eos, int):
            raise InvalidInputError("the tokenizer has no end-of-sequence token", param="tokenizer")
        bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
        self._eos = eos
        self._bos = bos if isinstance(bos, int) else eos
        self._pad = pad if isinstance(pad, int) else eos
        self._n_tokens = len(tokenizer)
        self._module.eval()

    # properties ------------------------------------------------------------------------------------------------------

    @property
    def arch(self) -> str:
        return self._arch

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        return self._tokenizer

    @property
    def context(self) -> int:
        return self._context

    @property
    def parameter_count(self) -> int:
        """Number of distinct parameters (tied embeddings count once)."""
        return sum(p.numel() for p in self._module.parameters())

    # internals -------------------------------------------------------------------------------------------------------

    @property
    def _device(self) -> torch.device:
        return next(self._module.parameters()).device

    def _encode(self, texts: list[str]) -> list[list[int]]:
        encoded = self._tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [list(ids) for ids in encoded]

    def _examples(self, data: object, param: str) -> list[list[int]]:
        examples: list[list[int]] = []
        stride = self._context - 1
        for body in self._encode(_texts(data, param)):
            ids = [self._bos, *body, self._eos]
            if len(ids) <= self._context:
                examples.append(ids)
                continue
            examples.extend(ids[start : start + self._context] for start in range(0, len(ids) - 1, stride))
        return examples

    def _collate(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            values = torch.tensor(row, dtype=torch.long)
            input_ids[i, : len(row)] = values
            labels[i, : len(row)] = values
            mask[i, : len(row)] = 1
        device = self._device
        return input_ids.to(device), labels.to(device), mask.to(device)

    def _logits(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self._arch == "gpt":
            output = self._module(input_ids=input_ids, attention_mask=mask, use_cache=False)
            gpt_logits: torch.Tensor = output.logits
            return gpt_logits
        lstm_logits: torch.Tensor = self._module(input_ids)
        return lstm_logits

    @contextmanager
    def _inference(self) -> Iterator[None]:
        was_training = self._module.training
        self._module.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self._module.train(was_training)

    def _last_logits(self, texts: list[str]) -> torch.Tensor:
        """Logits ``[len(texts), n_tokens]`` for the token after each text (vocabulary rows beyond it excluded)."""
        rows = [[self._bos, *ids][-self._context :] for ids in self._encode(texts)]
        input_ids, _, mask = self._collate(rows)
        logits = self._logits(input_ids, mask)
        last = torch.tensor([len(row) - 1 for row in rows], device=logits.device)
        picked = logits[torch.arange(len(rows), device=logits.device), last]
        return picked[:, : self._n_tokens].float()

    def _token_text(self, token_id: int) -> str:
        return _as_text(self._tokenizer.decode([token_id], skip_special_tokens=False))

    # training --------------------------------------------------------------------------------------------------------

    def fit(
        self,
        data: Sequence[str] | Sequence[Mapping[str, Any]],
        *,
        epochs: int = 1,
        batch_size: int = 16,
        optimizer: str | OptimizerConfig = "adamw",
        lr: float = 3e-3,
        max_steps: int | None = None,
        validation_data: Sequence[str] | Sequence[Mapping[str, Any]] | None = None,
        seed: int = 0,
        warmup_steps: int = 0,
        schedule: str = "constant",
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, list[float]]:
        """Train on ``data``; return the history: ``loss`` and ``lr`` per step, ``val_loss`` per epoch if validating.

        ``optimizer`` is a name from :data:`llmos.training.optim.OPTIMIZERS` (used with ``lr``) or a full
        :class:`OptimizerConfig` (whose own ``lr`` is used). Training stops after ``epochs`` passes or ``max_steps``
        optimizer steps, whichever comes first; the schedule spans exactly those steps. ``callback`` receives
        ``{"step", "epoch", "loss", "lr"}`` after every step and ``{"step", "epoch", "val_loss"}`` after every
        validation; an exception it raises stops training.
        """
        epochs = _int(epochs, "epochs", minimum=1)
        batch_size = _int(batch_size, "batch_size", minimum=1)
        if max_steps is not None:
            max_steps = _int(max_steps, "max_steps", minimum=1)
        seed = _int(seed, "seed", minimum=0)
        warmup_steps = _int(warmup_steps, "warmup_steps", minimum=0)
        if schedule not in SCHEDULES:
            raise InvalidInputError(
                f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}", param="schedule"
            )
        if callback is not None and not callable(callback):
            raise InvalidInputError("callback must be callable", param="callback")
        if isinstance(optimizer, OptimizerConfig):
            config = optimizer
        elif isinstance(optimizer, str):
            config = OptimizerConfig(name=optimizer, lr=lr)
        else:
            raise InvalidInputError("optimizer must be a name or an OptimizerConfig", param="optimizer")
        config.validate()
        examples = [Example(ids, list(ids)) for ids in self._examples(data, "data")]
        validation = None if validation_data is None else self._examples(validation_data, "validation_data")

        per_epoch = math.ceil(len(examples) / batch_size)
        total_steps = epochs * per_epoch if max_steps is None else min(max_steps, epochs * per_epoch)
        opt = build_optimizer(self._module.parameters(), config)
        scheduler = build_schedule(opt, warmup_steps=warmup_steps, total_steps=total_steps, kind=schedule)
        history: dict[str, list[float]] = {"loss": [], "lr": []}
        if validation is not None:
            history["val_loss"] = []

        def on_step(step: int, _total: int, metrics: dict[str, float]) -> bool:
            epoch = (step - 1) // per_epoch
            history["loss"].append(metrics["loss"])
            history["lr"].append(metrics["lr"])
            if callback is not None:
                callback({"step": step, "epoch": epoch, "loss": metrics["loss"], "lr": metrics["lr"]})
            if "val_loss" in metrics:
                history["val_loss"].append(metrics["val_loss"])
                if callback is not None:
                    callback({"step": step, "epoch": epoch, "val_loss": metrics["val_loss"]})
            return False

        plan = LoopPlan(
            total_steps=total_steps,
            steps_per_epoch=per_epoch,
            eval_every=per_epoch,
            clip=GRAD_CLIP,
            eval_batch_size=batch_size,
            validate_first=False,
        )
        loop = TrainingLoop(
            self._module,
            opt,
            scheduler,
            CrossEntropy(self._position_logits),
            plan,
            collective=Collective(self._device),
            on_step=on_step,
            log=lambda _message: None,
        )
        val_examples = [Example(ids, list(ids)) for ids in validation or []]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                loop.run(examples, val_examples, _epoch_order(len(examples), batch_size, seed), self._pad)
            finally:
                self._module.eval()
        return history

    def _position_logits(self, module: nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        return self._logits(batch["input_ids"], batch["attention_mask"])[:, :-1, :][keep]

    # inference -------------------------------------------------------------------------------------------------------

    def evaluate(self, data: Sequence[str] | Sequence[Mapping[str, Any]], batch_size: int = 16) -> dict[str, float]:
        """Token-weighted mean next-token ``loss`` over ``data`` and ``perplexity`` = exp(loss)."""
        batch_size = _int(batch_size, "batch_size", minimum=1)
        examples = [Example(ids, list(ids)) for ids in self._examples(data, "data")]
        measured = evaluate(self._module, CrossEntropy(self._position_logits), examples, self._pad, batch_size)
        loss = measured["loss"] if measured is not None else 0.0
        try:
            perplexity = math.exp(loss)
        except OverflowError:
            perplexity = math.inf
        return {"loss": loss, "perplexity": perplexity}

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The greedy next token (its text; special tokens as e.g. ``<eos>``) after each text."""
        items = self._prompts(texts)
        result: list[str] = []
        with self._inference():
            for start in range(0, len(items), 64):
                best = self._last_logits(items[start : start + 64]).argmax(dim=-1).tolist()
                result.extend(self._token_text(int(token)) for token in best)
        return result

    def _prompts(self, texts: object) -> list[str]:
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise InvalidInputError("texts must be a list of strings", param="texts")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidInputError(f"texts[{index}] must be a string, got {type(text).__name__}", param="texts")
        return list(texts)

    def next_token_probabilities(self, text: str) -> dict[str, float]:
        """The ten most likely next tokens after ``text`` with their probabilities, most likely first."""
        if not isinstance(text, str):
            raise InvalidInputError("text must be a string", param="text")
        with self._inference():
            probs = torch.softmax(self._last_logits([text])[0], dim=-1)
        values, indices = probs.topk(min(TOP_K, probs.shape[0]))
        result: dict[str, float] = {}
        for value, index in zip(values.tolist(), indices.tolist(), strict=True):
            key = self._token_text(int(index))
            result[key] = result.get(key, 0.0) + float(value)
        return result

    def generate_text(
        self, prompt: str, max_length: int = 50, temperature: float = 0.0, seed: int | None = None
    ) -> str:
        """Continue ``prompt`` by up to ``max_length`` tokens (greedy at temperature 0); return only the new text.

        Generation stops early at ``<eos>``; the model sees at most the last ``context`` tokens.
        """
        if not isinstance(prompt, str):
            raise InvalidInputError("prompt must be a string", param="prompt")
        max_length = _int(max_length, "max_length", minimum=0, maximum=MAX_GENERATE)
        temperature = _real(temperature, "temperature", minimum=0.0)
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(_int(seed, "seed", minimum=0))
        ids = [self._bos, *self._encode([prompt])[0]]
        new: list[int] = []
        with self._inference():
            for _ in range(max_length):
                window = (ids + new)[-self._context :]
                input_ids, _, mask = self._collate([window])
                logits = self._logits(input_ids, mask)[0, -1, : self._n_tokens].float().cpu()
                if temperature == 0.0:
                    token = int(logits.argmax().item())
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=generator).item())
                if token == self._eos:
                    break
                new.append(token)
        return _as_text(self._tokenizer.decode(new, skip_special_tokens=True))

    # persistence -----------------------------------------------------------------------------------------------------

    def save_pretrained(self, path: Path) -> None:
        """Write the model and tokenizer into ``path`` (an empty or not yet existing directory)."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise InvalidInputError(f"{path} must be an empty directory", param="path")
        path.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save_pretrained(str(path))
        if self._arch == "gpt":
            assert isinstance(self._module, LlamaForCausalLM)
            self._module.save_pretrained(str(path))
            return
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self._module.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        config = {
            "architectures": [LSTM_ARCHITECTURE],
            "model_type": LSTM_MODEL_TYPE,
            **self._lstm_config,
            "context": self._context,
            "bos_token_id": self._bos,
            "eos_token_id": self._eos,
            "pad_token_id": self._pad,
            "dtype": "float32",
        }
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --- construction and loading ---------------------------------------------------------------------------------------


def _epoch_order(count: int, batch_size: int, seed: int) -> Callable[[int], list[list[int]]]:
    """Batches of one epoch: the ``epoch``-th permutation drawn from one generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    drawn: list[list[int]] = []

    def order(epoch: int) -> list[list[int]]:
        while len(drawn) <= epoch:
            drawn.append(torch.randperm(count, generator=generator).tolist())
        rows = drawn[epoch]
        return [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]

    return order


def _estimate_parameters(arch: str, *, vocab: int, d_model: int, hidden: int, layers: int) -> int:
    if arch == "gpt":
        return vocab * d_model + layers * (4 * d_model * d_model + 3 * d_model * hidden + 2 * d_model) + d_model
    per_layer = 4 * hidden * (d_model + hidden + 2)
    return vocab * d_model + per_layer + (layers - 1) * 4 * hidden * (2 * hidden + 2) + (hidden + 1) * vocab


def _lstm_module(config: Mapping[str, Any]) -> LSTMLanguageModel:
    return LSTMLanguageModel(
        vocab_size=config["vocab_size"],
        d_model=config["d_model"],
        hidden_size=config["hidden_size"],
        num_layers=config["num_layers"],
        dropout=config["dropout"],
    )


def create_model(
    arch: str = "gpt",
    *,
    layers: int = 2,
    d_model: int = 64,
    heads: int = 4,
    vocab: int | None = None,
    context: int = 128,
    hidden: int | None = None,
    dropout: float = 0.0,
    tokenizer: PreTrainedTokenizerFast | None = None,
    texts: Iterable[str] | None = None,
    seed: int = 0,
) -> ScratchModel:
    """A new randomly initialised model; see the module docstring for the two architectures.

    ``hidden`` is the MLP width for ``gpt`` (default ``4 * d_model``) and the LSTM state size for ``lstm`` (default
    ``d_model``); ``heads`` only applies to ``gpt``. Give either ``tokenizer`` or ``texts`` (to build a character
    tokenizer from); ``vocab`` defaults to the tokenizer's size and may not be smaller.
    """
    if arch not in ARCHS:
        raise InvalidInputError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}", param="arch")
    layers = _int(layers, "layers", minimum=1, maximum=1024)
    d_model = _int(d_model, "d_model", minimum=1, maximum=65536)
    heads = _int(heads, "heads", minimum=1, maximum=1024)
    context = _int(context, "context", minimum=2, maximum=MAX_CONTEXT)
    dropout = _real(dropout, "dropout", minimum=0.0, below=1.0)
    seed = _int(seed, "seed", minimum=0)
    if hidden is not None:
        hidden = _int(hidden, "hidden", minimum=1, maximum=1 << 20)
    if arch == "gpt":
        if d_model % heads:
            raise InvalidInputError(f"d_model ({d_model}) must be divisible by heads ({heads})", param="heads")
        if (d_model // heads) % 2:
            raise InvalidInputError(
                f"d_model / heads ({d_model // heads}) must be even for rotary position embeddings", param="heads"
            )
    if tokenizer is None:
        if texts is None:
            raise InvalidInputError("give a tokenizer, or texts to build a character tokenizer from", param="texts")
        tokenizer = build_char_tokenizer(_texts(texts, "texts"))
    elif texts is not None:
        raise InvalidInputError("give either a tokenizer or texts to build one from, not both", param="texts")
    elif not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise InvalidInputError("tokenizer must be a transformers PreTrainedTokenizerFast", param="tokenizer")
    if not isinstance(tokenizer.eos_token_id, int):
        raise InvalidInputError("the tokenizer has no end-of-sequence token", param="tokenizer")
    size = len(tokenizer)
    vocab = size if vocab is None else _int(vocab, "vocab", minimum=size, maximum=1 << 24)
    width = hidden if hidden is not None else (4 * d_model if arch == "gpt" else d_model)
    estimate = _estimate_parameters(arch, vocab=vocab, d_model=d_model, hidden=width, layers=layers)
    if estimate > MAX_PARAMETERS:
        raise InvalidInputError(
            f"the model would have about {estimate:,} parameters, more than the {MAX_PARAMETERS:,} allowed here",
            param="d_model",
        )
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if isinstance(tokenizer.bos_token_id, int) else eos
    pad = tokenizer.pad_token_id if isinstance(tokenizer.pad_token_id, int) else eos
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "gpt":
            config = LlamaConfig(
                vocab_size=vocab,
                hidden_size=d_model,
                intermediate_size=width,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=heads,
                max_position_embeddings=context,
                rms_norm_eps=1e-5,
                attention_dropout=dropout,
                tie_word_embeddings=True,
                bos_token_id=bos,
                eos_token_id=eos,
                pad_token_id=pad,
                use_cache=True,
            )
            module = LlamaForCausalLM(config)
            module.generation_config.bos_token_id = bos
            module.generation_config.eos_token_id = eos
            module.generation_config.pad_token_id = pad
            return ScratchModel(module, tokenizer, arch="gpt", context=context)
        lstm_config = {
            "vocab_size": vocab,
            "d_model": d_model,
            "hidden_size": width,
            "num_layers": layers,
            "dropout": dropout,
        }
        return ScratchModel(_lstm_module(lstm_config), tokenizer, arch="lstm", context=context, lstm_config=lstm_config)


def _read_lstm_config(raw: Mapping[str, Any], path: Path) -> dict[str, Any]:
    config: dict[str, Any] = {}
    try:
        for key, maximum in (("vocab_size", 1 << 24), ("d_model", 65536), ("hidden_size", 1 << 20)):
            config[key] = _int(raw[key], key, minimum=1, maximum=maximum)
        config["num_layers"] = _int(raw["num_layers"], "num_layers", minimum=1, maximum=1024)
        config["dropout"] = _real(raw["dropout"], "dropout", minimum=0.0, below=1.0)
        context = _int(raw["context"], "context", minimum=2, maximum=MAX_CONTEXT)
    except KeyError as exc:
        raise InvalidModelFileError(f"{path / CONFIG_FILE} lacks the field {exc.args[0]!r}", param="path") from exc
    except InvalidInputError as exc:
        raise InvalidModelFileError(f"{path / CONFIG_FILE}: {exc.message}", param="path") from exc
    config["context"] = context
    return config


def load_scratch_model(path: Path) -> ScratchModel:
    """Load a directory written by :meth:`ScratchModel.save_pretrained` (either architecture)."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise InvalidInputError(f"{path} is not a model directory (no {CONFIG_FILE})", param="path")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidModelFileError(f"{config_file} is not valid JSON: {exc}", param="path") from exc
    if not isinstance(raw, dict):
        raise InvalidModelFileError(f"{config_file} must hold a JSON object", param="path")
    model_type = raw.get("model_type")
    if model_type not in (LLAMA_MODEL_TYPE, LSTM_MODEL_TYPE):
        raise InvalidModelFileError(
            f"{path} holds a {model_type!r} model; only {LLAMA_MODEL_TYPE!r} (gpt) and {LSTM_MODEL_TYPE!r} load here",
            param="path",
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise InvalidModelFileError(f"the tokenizer in {path} cannot be loaded: {exc}", param="path") from exc
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise InvalidModelFileError(f"the tokenizer in {path} is not a fast tokenizer", param="path")
    if model_type == LLAMA_MODEL_TYPE:
        try:
            gpt = LlamaForCausalLM.from_pretrained(str(path))
        except (OSError, ValueError, RuntimeError) as exc:
            raise InvalidModelFileError(f"the model in {path} cannot be loaded: {exc}", param="path") from exc
        context = int(gpt.config.max_position_embeddings)
        return ScratchModel(gpt, tokenizer, arch="gpt", context=context)
    config = _read_lstm_config(raw, path)
    context = config.pop("context")
    module = _lstm_module(config)
    try:
        state = load_file(str(path / WEIGHTS_FILE))
        module.load_state_dict(state, strict=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise InvalidModelFileError(f"the weights in {path} do not match its config: {exc}", param="path") from exc
    return ScratchModel(module, tokenizer, arch="lstm", context=context, lstm_config=config)
