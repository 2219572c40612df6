"""Evaluation gates: the condition a pipeline's candidate must meet before it is promoted.

Contract: a gate is a small expression over two sets of metrics, ``candidate.<metric>`` and ``baseline.<metric>``,
with numbers, ``+ - * /``, parentheses, comparisons (``< <= > >= == !=``, chained too), ``and`` / ``or`` / ``not``,
and ``abs`` / ``min`` / ``max``. Examples::

    candidate.perplexity <= baseline.perplexity * 0.95          # perplexity improves by at least 5%
    candidate.accuracy >= baseline.accuracy - 0.01               # accuracy drops by at most one point

:func:`parse_gate` checks the syntax and the names once (an expression that does not parse, or uses anything else,
is an :class:`~llmos.errors.InvalidInputError` naming the problem), so a recipe fails when it is submitted, not after
training. :meth:`Gate.check` evaluates it; a metric missing from the reports is an error naming it. Nothing is ever
passed to ``eval``: the expression is interpreted from its syntax tree.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from llmos.errors import InvalidInputError

SIDES = ("candidate", "baseline")
_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
}  # fmt: skip
_COMPARE: dict[type[ast.cmpop], Callable[[float, float], bool]] = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
}  # fmt: skip
_FUNCTIONS: dict[str, Callable[..., float]] = {"abs": abs, "min": min, "max": max}


def _refuse(expression: str, why: str) -> InvalidInputError:
    return InvalidInputError(f"gate {expression!r} is not a valid gate expression: {why}", param="gate")


def _check(node: ast.AST, expression: str, metrics: set[tuple[str, str]]) -> None:
    """Refuse any syntax outside the gate language; collect the (side, metric) pairs it reads."""
    if isinstance(node, ast.Expression):
        _check(node.body, expression, metrics)
    elif isinstance(node, ast.BoolOp):
        for value in node.values:
            _check(value, expression, metrics)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub | ast.UAdd):
        _check(node.operand, expression, metrics)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        _check(node.left, expression, metrics)
        _check(node.right, expression, metrics)
    elif isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        for part in (node.left, *node.comparators):
            _check(part, expression, metrics)
    elif isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        pass
    elif isinstance(node, ast.Attribute):
        if not (isinstance(node.value, ast.Name) and node.value.id in SIDES):
            raise _refuse(expression, "metrics are written candidate.<metric> or baseline.<metric>")
        metrics.add((node.value.id, node.attr))
    elif isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS) or node.keywords:
            raise _refuse(expression, f"the only functions are {', '.join(_FUNCTIONS)}")
        for arg in node.args:
            _check(arg, expression, metrics)
    elif isinstance(node, ast.Name):
        raise _refuse(expression, f"unknown name {node.id!r} (use candidate.<metric> or baseline.<metric>)")
    else:
        raise _refuse(expression, f"{type(node).__name__} is not allowed")


@dataclass(frozen=True)
class Gate:
    expression: str
    tree: ast.Expression
    metrics: frozenset[tuple[str, str]]

    @property
    def metric_names(self) -> set[str]:
        return {metric for _side, metric in self.metrics}

    def check(self, candidate: Mapping[str, Any], baseline: Mapping[str, Any]) -> bool:
        """Whether the candidate's metrics pass against the baseline's."""
        sides = {"candidate": candidate, "baseline": baseline}
        for side, metric in self.metrics:
            value = sides[side].get(metric)
            if not isinstance(value, int | float) or isinstance(value, bool):
                reported = ", ".join(sorted(sides[side])) or "nothing"
                raise InvalidInputError(
                    f"gate {self.expression!r} reads {side}.{metric}, which the evaluation did not report"
                    f" (it reported: {reported})",
                    param="gate",
                )
        return bool(self._value(self.tree.body, sides))

    def _value(self, node: ast.AST, sides: Mapping[str, Mapping[str, Any]]) -> Any:
        if isinstance(node, ast.BoolOp):
            values = [self._value(v, sides) for v in node.values]
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.UnaryOp):
            operand = self._value(node.operand, sides)
            return (
                not operand
                if isinstance(node.op, ast.Not)
                else (-operand if isinstance(node.op, ast.USub) else +operand)
            )
        if isinstance(node, ast.BinOp):
            left, right = self._value(node.left, sides), self._value(node.right, sides)
            if isinstance(node.op, ast.Div) and right == 0:
                raise InvalidInputError(f"gate {self.expression!r} divides by zero", param="gate")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.Compare):
            left = self._value(node.left, sides)
            for op, comparator in zip(node.ops, node.comparators, strict=True):
                right = self._value(comparator, sides)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Attribute):
            assert isinstance(node.value, ast.Name)
            return float(sides[node.value.id][node.attr])
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Name)
            return _FUNCTIONS[node.func.id](*(self._value(arg, sides) for arg in node.args))
        raise AssertionError(f"unchecked node {type(node).__name__}")  # parse_gate refused it


def parse_gate(expression: str) -> Gate:
    text = expression.strip()
    if not text:
        raise InvalidInputError("the gate expression is empty", param="gate")
    if len(text) > 1000:
        raise InvalidInputError("the gate expression is longer than 1000 characters", param="gate")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise _refuse(text, f"it does not parse ({exc.msg} at column {exc.offset})") from exc
    metrics: set[tuple[str, str]] = set()
    _check(tree, text, metrics)
    if not metrics:
        raise _refuse(text, "it reads no metric (write e.g. candidate.perplexity < baseline.perplexity)")
    return Gate(text, tree, frozenset(metrics))
