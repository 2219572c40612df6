"""Evaluation tasks without a model: answer normalization, exact-match rules, task YAML validation, rows -> items,
and multiple-choice scoring through a real engine over the deterministic FakeBackend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmos.engine.backends.fake import FakeBackend
from llmos.engine.core import EngineConfig, EngineCore
from llmos.engine.request import GenerationRequest
from llmos.errors import InvalidInputError
from llmos.evaluation.metrics import choice_accuracy, contains_answer, exact_match, is_exact_match, normalize_answer
from llmos.evaluation.runner import run_requests
from llmos.evaluation.scoring import run_generate, run_multiple_choice
from llmos.evaluation.tasks import ChoiceItem, GenerateItem, builtin_task, load_task_file, make_items, parse_task
from llmos.runtime.model import LoadedModel
from llmos.types import ChatMessage, SamplingParams

MC_TASK: dict[str, Any] = {
    "name": "capitals",
    "type": "multiple_choice",
    "prompt": "Question: {question}\nAnswer:",
    "reference": "answer",
    "choices": "options",
    "metric": "accuracy",
}


def test_normalization_ignores_case_punctuation_articles_and_whitespace() -> None:
    assert normalize_answer("  The Eiffel   Tower! ") == "eiffel tower"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("Theatre") == "theatre"  # "the" only as a whole word
    assert is_exact_match("PARIS.", "paris")
    assert not is_exact_match("Paris, France", "Paris")


def test_contains_matches_whole_words_and_any_reference() -> None:
    assert contains_answer("The capital of France is Paris.", "Paris")
    assert not contains_answer("Parisian food", "Paris")
    assert contains_answer("It is 94 seconds", ["ninety-four", "94 seconds"])
    assert not contains_answer("anything", "")  # an empty reference is never "contained"
    scores = exact_match(["Paris", "It is Berlin.", "Rome?", "no idea"], ["paris", "Berlin", ("Roma", "Rome"), "Oslo"])
    assert scores == {"exact_match": 0.5, "contains": 0.75}
    with pytest.raises(InvalidInputError):
        exact_match(["a"], ["a", "b"])


def test_choice_accuracy_and_its_length_normalized_variant_differ() -> None:
    # question 0: the long right answer has the lower total but the higher per-character log-likelihood
    scores = [[-8.0, -6.0], [-1.0, -5.0]]
    choices = [["a much longer answer", "short"], ["yes", "no"]]
    assert choice_accuracy(scores, choices, [0, 0]) == {"accuracy": 0.5, "accuracy_norm": 1.0}


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"reference": None}, "reference"),
        ({"metric": "bleu"}, "metric"),  # multiple choice is scored by accuracy
        ({"metric": "meteor"}, "metric"),
        ({"type": "ranking"}, "type"),
        ({"choices": None}, "choices"),
        ({"temperature": 0.2}, "temperature"),  # unknown field
        ({"prompt": "Q: {question.__class__}"}, "prompt"),  # placeholders are plain field names only
        ({"prompt": "Q: {question"}, "prompt"),
        ({"prompt": "no placeholder"}, "prompt"),
        ({"name": "bleu"}, "name"),  # a built-in task's name
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [1]}, "stop"),
    ],
)
def test_bad_task_fields_are_refused_naming_the_field(change: dict[str, Any], param: str) -> None:
    raw = {k: v for k, v in {**MC_TASK, **change}.items() if v is not None}
    with pytest.raises(InvalidInputError) as caught:
        parse_task(raw)
    assert caught.value.param == param, str(caught.value)
    assert param in str(caught.value)


def test_task_file_round_trip_and_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "task.yaml"
    path.write_text(
        "name: qa\ntype: generate\nprompt: 'Q: {prompt}'\nreference: completion\nmetric: rouge\nstop: END\n"
    )
    spec = load_task_file(path)
    assert (spec.type, spec.metric, spec.stop, spec.chat, spec.custom) == ("generate", "rouge", ("END",), None, True)
    assert parse_task(spec.fields()) == spec  # what a job stores reads back the same
    path.write_text("name: [unclosed\n")
    with pytest.raises(InvalidInputError, match="not valid YAML"):
        load_task_file(path)
    path.write_text("- a list\n")
    with pytest.raises(InvalidInputError, match="mapping"):
        load_task_file(path)


def test_rows_become_items_and_bad_rows_name_row_and_field() -> None:
    spec = parse_task(MC_TASK)
    rows = [{"question": "Capital of France?", "options": ["Berlin", "Paris"], "answer": "paris"}]
    assert make_items(spec, rows) == [ChoiceItem("Question: Capital of France?\nAnswer:", ("Berlin", "Paris"), 1)]
    bad = [
        ({"options": ["a", "b"], "answer": 0}, "question"),  # a placeholder the row lacks
        ({"question": "q", "options": ["a", "b"], "answer": 2}, "outside"),
        ({"question": "q", "options": ["a", "b"], "answer": "c"}, "neither"),
        ({"question": "q", "options": "a", "answer": 0}, "at least two"),
    ]
    for row, message in bad:
        with pytest.raises(InvalidInputError, match=message) as caught:
            make_items(spec, [rows[0], row])
        assert "row 1" in str(caught.value)
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                         {"role": "assistant", "content": "Hello."}]}  # fmt: skip
    items = make_items(builtin_task("exact_match"), [chat, {"prompt": "2+2=", "completion": "4"}])
    assert items == [
        GenerateItem((ChatMessage("system", "Be brief."), ChatMessage("user", "Hi?")), "Hello."),
        GenerateItem("2+2=", "4"),
    ]
    with pytest.raises(InvalidInputError, match="prompt/completion or chat"):
        make_items(builtin_task("bleu"), [{"text": "just text"}])


# --- through the engine -----------------------------------------------------------------------------------------------


@pytest.fixture
def fake_model() -> Iterator[LoadedModel]:
    backend = FakeBackend(n_seq_max=2, n_ctx_seq=128, n_batch=64)
    engine = EngineCore(backend, EngineConfig(max_waiting=3))  # fewer than the requests: submission must wait
    model = LoadedModel(view=None, backend=backend, engine=engine)  # type: ignore[arg-type]
    yield model
    model.close()


def test_requests_beyond_the_queue_bound_all_complete_in_order(fake_model: LoadedModel) -> None:
    params = SamplingParams(max_tokens=3, temperature=0.0)
    requests = [GenerationRequest(list(f"{i:02d}".encode()), params) for i in range(10)]
    seen: list[int] = []
    results = run_requests(fake_model, requests, lambda done, total: seen.append(done))
    # FakeBackend counts up from the last prompt byte: "00" -> "123", "01" -> "234", ...
    assert [r.text for r in results] == [bytes([50 + i % 10 - 1 + k for k in range(3)]).decode() for i in range(10)]
    assert seen == list(range(1, 11))


def test_multiple_choice_picks_the_likeliest_continuation(fake_model: LoadedModel) -> None:
    spec = parse_task({**MC_TASK, "chat": False})
    # after "x " the fake model continues with "!", '"', "#", ...: only the choice following that path is likely
    items = [
        ChoiceItem("x ", ("abc", '!"#', "zz"), 1),
        ChoiceItem("x ", ('!"', "q"), 0),
        ChoiceItem("x ", ("q", "!"), 0),  # wrong on purpose: the model prefers "!"
    ]
    result = run_multiple_choice(fake_model, spec, items)
    assert result.metrics == {"accuracy": 2 / 3, "accuracy_norm": 2 / 3}
    assert result.examples[2]["picked"] == "!" and result.samples == 3 and not result.chat


def test_generation_is_greedy_and_scored(fake_model: LoadedModel) -> None:
    spec = parse_task({"name": "count", "type": "generate", "prompt": "{p}", "reference": "r", "metric": "exact_match",
                       "max_tokens": 3, "chat": False})  # fmt: skip
    items = [GenerateItem("ab", "cde"), GenerateItem("01", "999")]
    result = run_generate(fake_model, spec, items)
    assert [e["prediction"] for e in result.examples] == ["cde", "234"]
    assert result.metrics == {"exact_match": 0.5, "contains": 0.5} and result.tokens == 6


def test_scoring_from_an_index_computes_no_logits_for_the_context_before_it(fake_model: LoadedModel) -> None:
    backend = fake_model.backend
    assert isinstance(backend, FakeBackend)
    prompt = list(b"!\"#$%&'()*+,-./0")  # counts up: every token is the fake model's prediction (logprob 0)
    params = SamplingParams(max_tokens=0, temperature=0.0)
    plain, windowed = run_requests(
        fake_model,
        [
            GenerationRequest(prompt, params, prompt_logprobs=True),
            GenerationRequest(prompt, params, prompt_logprobs=True, score_from=6),
        ],
    )
    assert [lp.logprob for lp in plain.prompt_logprobs] == [None] + [0.0] * 15
    assert [lp.logprob for lp in windowed.prompt_logprobs] == [None] * 6 + [0.0] * 10
    assert [lp.token for lp in windowed.prompt_logprobs] == prompt
    # the windowed request's first 5 positions ran as a chunk of their own (the fake backend records every batch)
    assert [n for batch in backend.batches for slot, n in batch if n != 16] == [5, 11]
