"""From-scratch models: a tiny GPT and an LSTM learn a counting language, save, load and generate correctly."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmos.errors import InvalidInputError, InvalidModelFileError
from llmos.training.charset import build_char_tokenizer
from llmos.training.optim import OptimizerConfig
from llmos.training.scratch import ScratchModel, create_model, load_scratch_model

# "1 2 3 ... 16", "2 3 4 ... 17", ..., "12 13 ... 27": after the first number every character is determined, so
# a model that learnt to count reaches a mean loss near the entropy of the first character (~0.06 nats/token)
LINES = [" ".join(str(n) for n in range(start, start + 16)) for start in range(1, 13)]
GPT = {"layers": 2, "d_model": 64, "heads": 4, "context": 64}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gpt() -> tuple[ScratchModel, dict[str, list[float]]]:
    model = create_model("gpt", texts=LINES, seed=0, **GPT)
    history = model.fit(LINES, epochs=1000, batch_size=12, lr=3e-3, max_steps=150)
    return model, history


@pytest.fixture(scope="module")
def lstm() -> tuple[ScratchModel, dict[str, list[float]]]:
    model = create_model("lstm", layers=1, d_model=64, context=64, texts=LINES, seed=0)
    history = model.fit(LINES, epochs=1000, batch_size=12, lr=1e-2, max_steps=200)
    return model, history


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _logits(model: ScratchModel, text: str) -> torch.Tensor:
    ids = torch.tensor([model.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        if model.arch == "gpt":
            return model.module(input_ids=ids).logits  # type: ignore[no-any-return]
        return model.module(ids)  # type: ignore[no-any-return]


# --- construction ---------------------------------------------------------------------------------------------------


def test_gpt_is_a_small_tied_llama() -> None:
    model = create_model("gpt", layers=1, d_model=32, heads=2, context=16, texts=["abc"])
    module: Any = model.module
    assert type(module).__name__ == "LlamaForCausalLM"
    assert module.config.num_hidden_layers == 1
    assert module.config.hidden_size == 32
    assert module.config.intermediate_size == 128
    assert module.config.max_position_embeddings == 16
    assert module.config.vocab_size == len(model.tokenizer) == 4 + 3
    assert module.lm_head.weight.data_ptr() == module.model.embed_tokens.weight.data_ptr()
    assert model.arch == "gpt"
    assert model.context == 16
    assert model.parameter_count == sum(p.numel() for p in module.parameters())


def test_lstm_shape_and_explicit_vocab() -> None:
    tokenizer = build_char_tokenizer(["abc"])
    model = create_model("lstm", layers=2, d_model=16, hidden=24, vocab=20, tokenizer=tokenizer)
    module: Any = model.module
    assert module.lstm.num_layers == 2
    assert module.lstm.hidden_size == 24
    assert module.embedding.num_embeddings == 20
    assert module.head.out_features == 20
    assert model.tokenizer is tokenizer


def test_same_seed_same_model_and_training() -> None:
    runs = []
    for seed in (3, 3, 4):
        model = create_model("gpt", layers=1, d_model=16, heads=2, context=32, texts=LINES, seed=seed)
        history = model.fit(LINES[:4], batch_size=2, epochs=2, seed=seed)
        runs.append((history["loss"], torch.cat([p.flatten() for p in model.module.parameters()])))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0]
    assert not torch.equal(runs[0][1], runs[2][1])


# --- learning the counting language --------------------------------------------------------------------------------


def test_gpt_learns_to_count(gpt: tuple[ScratchModel, dict[str, list[float]]]) -> None:
    model, history = gpt
    assert len(history["loss"]) == 150
    assert _mean(history["loss"][:10]) > 1.0
    assert _mean(history["loss"][-10:]) < 0.1
    assert model.generate_text("2 3 4 ", max_length=12) == "5 6 7 8 9 10"
    assert model.generate_text("2 3 4 ", max_length=200) == "5 6 7 8 9 10 11 12 13 14 15 16 17"  # stops at <eos>
    assert model.generate_text("7 8 9 ").startswith("10 11 12 ")
    assert model.predict(["2 3 4 ", "9 10 11 1", "5 6"]) == ["5", "2", " "]


def test_gpt_next_token_probabilities(gpt: tuple[ScratchModel, dict[str, list[float]]]) -> None:
    model, _ = gpt
    probs = model.next_token_probabilities("2 3 4 ")
    assert len(probs) == 10
    assert next(iter(probs)) == "5"
    assert probs["5"] > 0.9
    values = list(probs.values())
    assert values == sorted(values, reverse=True)
    assert sum(values) <= 1.0 + 1e-6


def test_evaluate_reports_token_weighted_loss_and_perplexity(gpt: tuple[ScratchModel, dict[str, list[float]]]) -> None:
    model, _ = gpt
    result = model.evaluate(LINES, batch_size=5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    assert result["loss"] < 0.1
    assert model.evaluate(LINES, batch_size=1)["loss"] == pytest.approx(result["loss"], rel=1e-5)
    # token weighting: one short and one long text; the mean is over tokens, not texts
    short, long = "1 2", LINES[0]
    per_text = [model.evaluate([text])["loss"] for text in (short, long)]
    tokens = [len(short) + 1, len(long) + 1]
    weighted = (per_text[0] * tokens[0] + per_text[1] * tokens[1]) / sum(tokens)
    assert model.evaluate([short, long])["loss"] == pytest.approx(weighted, rel=1e-5)
    assert model.evaluate(["9 8 7 6 5 4 3 2 1"])["loss"] > 1.0  # counting down is not the learnt language


def test_lstm_learns_to_count(lstm: tuple[ScratchModel, dict[str, list[float]]]) -> None:
    model, history = lstm
    assert _mean(history["loss"][:10]) > 1.0
    assert _mean(history["loss"][-10:]) < 0.3
    assert model.generate_text("2 3 4 ", max_length=8) == "5 6 7 8 "


# --- saving and loading ---------------------------------------------------------------------------------------------


def test_gpt_round_trip_gives_identical_logits(
    gpt: tuple[ScratchModel, dict[str, list[float]]], tmp_path: Path
) -> None:
    model, _ = gpt
    model.save_pretrained(tmp_path / "gpt")
    names = {path.name for path in (tmp_path / "gpt").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    loaded = load_scratch_model(tmp_path / "gpt")
    assert loaded.arch == "gpt"
    assert loaded.context == 64
    assert torch.equal(_logits(loaded, "3 4 5 6 "), _logits(model, "3 4 5 6 "))
    assert loaded.generate_text("2 3 4 ", max_length=12) == "5 6 7 8 9 10"


def test_gpt_directory_loads_with_transformers(
    gpt: tuple[ScratchModel, dict[str, list[float]]], tmp_path: Path
) -> None:
    model, _ = gpt
    model.save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path)
    inputs = tokenizer("2 3 4 ", return_tensors="pt")
    output = hf_model.generate(**inputs, max_new_tokens=12, do_sample=False)
    continuation = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert continuation == model.generate_text("2 3 4 ", max_length=12) == "5 6 7 8 9 10"
    with torch.no_grad():
        hf_logits = hf_model(**inputs).logits
    assert torch.equal(hf_logits, _logits(model, "2 3 4 "))


def test_lstm_round_trip_gives_identical_logits(
    lstm: tuple[ScratchModel, dict[str, list[float]]], tmp_path: Path
) -> None:
    model, _ = lstm
    model.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    assert '"LlmosLSTM"' in config
    assert '"llmos-lstm"' in config
    loaded = load_scratch_model(tmp_path)
    assert loaded.arch == "lstm"
    assert loaded.context == model.context
    assert loaded.parameter_count == model.parameter_count
    assert torch.equal(_logits(loaded, "5 6 7 "), _logits(model, "5 6 7 "))
    assert loaded.generate_text("2 3 4 ", max_length=8) == model.generate_text("2 3 4 ", max_length=8)


def test_save_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    model = create_model("lstm", layers=1, d_model=8, texts=["ab"])
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(InvalidInputError) as info:
        model.save_pretrained(tmp_path)
    assert info.value.param == "path"
    assert [path.name for path in tmp_path.iterdir()] == ["keep.txt"]


def test_load_refuses_missing_and_foreign_directories(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError) as info:
        load_scratch_model(tmp_path)
    assert info.value.param == "path"
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(InvalidModelFileError):
        load_scratch_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidModelFileError):
        load_scratch_model(tmp_path)


def test_load_refuses_lstm_weights_that_do_not_match_the_config(tmp_path: Path) -> None:
    create_model("lstm", layers=1, d_model=8, texts=["ab"]).save_pretrained(tmp_path / "a")
    create_model("lstm", layers=1, d_model=12, texts=["ab"]).save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").replace(tmp_path / "a" / "model.safetensors")
    with pytest.raises(InvalidModelFileError):
        load_scratch_model(tmp_path / "a")


# --- data handling --------------------------------------------------------------------------------------------------


def test_rows_are_read_like_their_text() -> None:
    model = create_model("lstm", layers=1, d_model=16, texts=["hello there\nhi"], seed=1)
    plain = model.evaluate(["hello", "hi there", "there\nhello"])["loss"]
    rows = [
        {"text": "hello"},
        {"prompt": "hi ", "completion": "there"},
        {"messages": [{"role": "user", "content": "there"}, {"role": "assistant", "content": "hello"}]},
    ]
    assert model.evaluate(rows)["loss"] == pytest.approx(plain, rel=1e-6)


def test_long_texts_are_split_into_windows_that_cover_every_pair() -> None:
    model = create_model("gpt", layers=1, d_model=16, heads=2, context=8, texts=LINES)
    text = LINES[0]
    examples = model._examples([text], "data")
    assert all(len(example) <= 8 for example in examples)
    ids = [model.tokenizer.bos_token_id, *model.tokenizer.encode(text, add_special_tokens=False)]
    ids.append(model.tokenizer.eos_token_id)
    pairs = [(a, b) for example in examples for a, b in itertools.pairwise(example)]
    assert pairs == list(itertools.pairwise(ids))
    history = model.fit([text], batch_size=4, epochs=1)
    assert len(history["loss"]) == math.ceil(len(examples) / 4)


def test_validation_history_callback_and_schedule() -> None:
    model = create_model("gpt", layers=1, d_model=16, heads=2, context=64, texts=LINES)
    events: list[dict[str, Any]] = []
    history = model.fit(
        LINES,
        epochs=3,
        batch_size=4,
        lr=1e-2,
        validation_data=LINES[:2],
        warmup_steps=3,
        schedule="cosine",
        callback=events.append,
    )
    assert len(history["loss"]) == 9
    assert len(history["val_loss"]) == 3
    assert history["lr"][:3] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2])
    assert history["lr"][-1] < 1e-2 / 2
    assert [event["step"] for event in events if "loss" in event] == list(range(1, 10))
    assert [event["val_loss"] for event in events if "val_loss" in event] == history["val_loss"]
    assert history["val_loss"][-1] < history["val_loss"][0]
    assert not model.module.training


def test_max_steps_and_optimizer_config() -> None:
    model = create_model("lstm", layers=1, d_model=8, texts=LINES)
    history = model.fit(LINES, epochs=5, batch_size=2, max_steps=7, optimizer=OptimizerConfig(name="sgd", lr=0.05))
    assert len(history["loss"]) == 7
    assert history["lr"] == [0.05] * 7


def test_vocab_larger_than_tokenizer_never_emits_unknown_ids() -> None:
    model = create_model("lstm", layers=1, d_model=16, context=16, vocab=64, texts=["ab"], seed=2)
    module: Any = model.module
    with torch.no_grad():
        module.head.bias[len(model.tokenizer) :] = 1000.0  # the unused ids would win an unrestricted argmax
    assert set(model.generate_text("a", max_length=10)) <= {"a", "b"}
    assert set(model.predict(["a", "b"])) <= {"a", "b", "<pad>", "<bos>", "<eos>", "<unk>"}
    assert set(model.next_token_probabilities("ab")) <= {"a", "b", "<pad>", "<bos>", "<eos>", "<unk>"}


def test_sampling_is_seeded() -> None:
    model = create_model("gpt", layers=1, d_model=16, heads=2, context=32, texts=LINES, seed=0)
    first = model.generate_text("1 ", max_length=20, temperature=1.0, seed=7)
    assert first == model.generate_text("1 ", max_length=20, temperature=1.0, seed=7)
    others = {model.generate_text("1 ", max_length=20, temperature=1.0, seed=seed) for seed in range(8)}
    assert len(others) > 1


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"arch": "rnn"}, "arch"),
        ({"layers": 0}, "layers"),
        ({"d_model": 30, "heads": 4}, "heads"),
        ({"d_model": 12, "heads": 4}, "heads"),  # head size 3 is odd: no rotary embedding
        ({"context": 1}, "context"),
        ({"vocab": 3}, "vocab"),
        ({"dropout": 1.0}, "dropout"),
        ({"hidden": 0}, "hidden"),
        ({"texts": None}, "texts"),
        ({"texts": []}, "texts"),
        ({"texts": "1 2 3"}, "texts"),
        ({"tokenizer": build_char_tokenizer(["ab"])}, "texts"),
        ({"d_model": 65536, "layers": 1024}, "d_model"),
    ],
)
def test_create_model_refuses_bad_arguments(kwargs: dict[str, Any], param: str) -> None:
    arguments: dict[str, Any] = {"texts": LINES, **kwargs}
    with pytest.raises(InvalidInputError) as info:
        create_model(**arguments)
    assert info.value.param == param


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"data": []}, "data"),
        ({"data": "1 2 3"}, "data"),
        ({"data": [{"title": "no text"}]}, "data"),
        ({"data": [3]}, "data"),
        ({"batch_size": 0}, "batch_size"),
        ({"epochs": 0}, "epochs"),
        ({"max_steps": 0}, "max_steps"),
        ({"lr": -1.0}, "lr"),
        ({"optimizer": "adagrad"}, "optimizer"),
        ({"schedule": "step"}, "schedule"),
        ({"warmup_steps": 50}, "warmup_steps"),
        ({"validation_data": []}, "validation_data"),
    ],
)
def test_fit_refuses_bad_arguments(kwargs: dict[str, Any], param: str) -> None:
    model = create_model("lstm", layers=1, d_model=8, texts=LINES)
    before = [p.detach().clone() for p in model.module.parameters()]
    arguments: dict[str, Any] = {"data": LINES, **kwargs}
    with pytest.raises(InvalidInputError) as info:
        model.fit(**arguments)
    assert info.value.param == param
    assert all(torch.equal(a, b) for a, b in zip(before, model.module.parameters(), strict=True))


def test_inference_refuses_bad_arguments() -> None:
    model = create_model("lstm", layers=1, d_model=8, texts=LINES)
    cases: list[tuple[Any, str]] = [
        (lambda: model.evaluate([]), "data"),
        (lambda: model.evaluate(LINES, batch_size=0), "batch_size"),
        (lambda: model.predict("1 2"), "texts"),
        (lambda: model.generate_text("1", max_length=-1), "max_length"),
        (lambda: model.generate_text("1", temperature=-0.5), "temperature"),
        (lambda: model.generate_text("1", temperature=math.nan), "temperature"),
    ]
    for call, param in cases:
        with pytest.raises(InvalidInputError) as info:
            call()
        assert info.value.param == param
