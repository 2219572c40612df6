"""Gate expressions: what parses, what is refused (with a message naming the problem), how they evaluate."""

from __future__ import annotations

import pytest

from llmos.errors import InvalidInputError
from llmos.evaluation.gate import parse_gate


@pytest.mark.parametrize(
    ("expression", "candidate", "baseline", "expected"),
    [
        ("candidate.perplexity <= baseline.perplexity * 0.95", {"perplexity": 9.0}, {"perplexity": 10.0}, True),
        ("candidate.perplexity <= baseline.perplexity * 0.95", {"perplexity": 9.6}, {"perplexity": 10.0}, False),
        ("candidate.accuracy >= baseline.accuracy - 0.01", {"accuracy": 0.795}, {"accuracy": 0.80}, True),
        ("candidate.accuracy >= baseline.accuracy - 0.01", {"accuracy": 0.78}, {"accuracy": 0.80}, False),
        ("0 < candidate.bleu < 100 and not candidate.bleu < baseline.bleu", {"bleu": 20}, {"bleu": 10}, True),
        ("abs(candidate.x - baseline.x) / baseline.x <= 0.01 or candidate.x < 0", {"x": 1.0}, {"x": 1.2}, False),
        ("max(candidate.a, candidate.b) > min(baseline.a, 3)", {"a": 1, "b": 4}, {"a": 2}, True),
    ],
)
def test_gates_evaluate(expression: str, candidate: dict, baseline: dict, expected: bool) -> None:
    assert parse_gate(expression).check(candidate, baseline) is expected


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("candidate.perplexity <", "does not parse"),
        ("candidate.perplexity < < 3", "does not parse"),
        ("", "empty"),
        ("__import__('os').system('true')", "functions"),
        ("perplexity < 3", "unknown name 'perplexity'"),
        ("candidate.perplexity ** 2 < 3", "not allowed"),
        ("candidate.x.y < 3", "candidate.<metric>"),
        ("other.perplexity < 3", "candidate.<metric>"),
        ("candidate.perplexity < 'ten'", "not allowed"),
        ("1 < 2", "reads no metric"),
        ("[candidate.x][0] < 1", "not allowed"),
        ("candidate.x if True else 1", "not allowed"),
    ],
)
def test_bad_gates_are_refused_with_the_reason(expression: str, message: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse_gate(expression)
    assert message in str(caught.value)
    assert caught.value.param == "gate"


def test_a_metric_the_evaluation_did_not_report_is_named() -> None:
    gate = parse_gate("candidate.accuracy > baseline.accuracy")
    with pytest.raises(InvalidInputError, match=r"candidate\.accuracy.*it reported: perplexity"):
        gate.check({"perplexity": 3.0}, {"accuracy": 1.0})
    with pytest.raises(InvalidInputError, match="divides by zero"):
        parse_gate("candidate.x / baseline.x > 1").check({"x": 1}, {"x": 0})
