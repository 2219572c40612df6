"""Grow a dataset: template expansion, rule-based prompt rewrites and model paraphrases.

Contract:

* :func:`expand_templates` renders ``spec["template"]`` (a row whose strings may hold ``{name}`` placeholders, nested
  lists/dicts allowed, so chat templates work) for every combination of ``spec["values"]``, in the order the values
  are given (the last name varies fastest). Every placeholder must have values and every value list must be used;
  placeholders are plain names (``{{``/``}}`` give literal braces). More than 100,000 rows raises before anything is
  rendered. The rendered rows must have an accepted shape.
* :func:`augment_rules` keeps every row and adds, right after it, one variant per question template
  (``"Q: {prompt}"``) whose prompt (completion rows) or last user message (chat rows) is rewritten; variants carry
  ``"augmented": "rule"``. A template must contain ``{prompt}`` and no other placeholder.
* :func:`paraphrase` asks a model to rewrite each prompt: it builds one instruction per row and calls
  ``generate(instructions)`` exactly once per variant round (one batch), cleans each output (first meaningful line,
  labels like "Question:" and surrounding quotes removed) and rejects empty outputs, outputs identical to the
  original, outputs more than 3x longer than it, and repeats. Accepted paraphrases are appended after all original
  rows with the same completion (or the same later messages) and ``"augmented": "model"``.

Text rows cannot be rewritten: :func:`augment_rules` and :func:`paraphrase` raise for them. Input rows are never
mutated. Note that :func:`~llmos.data.split.split` hashes content, so a variant may land in another split than its
original: augment the train split after splitting, not before.
"""

from __future__ import annotations

import itertools
import math
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

from llmos.data.rows import Row, check_row, dataset_shape
from llmos.errors import InvalidInputError

MAX_EXPANDED_ROWS = 100_000
PARAPHRASE_INSTRUCTION = (
    "Rewrite this question with different words, keeping its meaning. Reply with the rewritten question only."
)
MAX_PARAPHRASE_RATIO = 3.0
_PLACEHOLDER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FORMATTER = string.Formatter()


# --- templates --------------------------------------------------------------------------------------------------------


def _parse(template: str, where: str) -> list[tuple[str, str | None]]:
    """Split a template into (literal, placeholder-or-None) pieces, refusing anything but plain names."""
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise InvalidInputError(f"{where} is not a valid template: {exc}", param="template") from None
    pieces: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in parsed:
        if name is not None and (not _PLACEHOLDER_NAME.fullmatch(name) or spec or conversion):
            raise InvalidInputError(
                f"{where} has placeholder {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}}; placeholders must be plain names like {{product}}",
                param="template",
            )
        pieces.append((literal, name))
    return pieces


def _placeholders(value: Any, where: str, found: set[str]) -> None:
    if isinstance(value, str):
        found.update(name for _, name in _parse(value, where) if name is not None)
    elif isinstance(value, dict):
        for key, item in value.items():
            _placeholders(item, f"{where}.{key}", found)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _placeholders(item, f"{where}[{i}]", found)


def _render(value: Any, binding: dict[str, str]) -> Any:
    if isinstance(value, str):
        return "".join(literal + (binding[name] if name is not None else "") for literal, name in _parse(value, ""))
    if isinstance(value, dict):
        return {key: _render(item, binding) for key, item in value.items()}
    if isinstance(value, list):
        return [_render(item, binding) for item in value]
    return value


def expand_templates(spec: dict[str, Any]) -> list[Row]:
    """The cartesian product of ``spec["values"]`` rendered into ``spec["template"]``; see the module docstring."""
    if not isinstance(spec, dict) or not isinstance(spec.get("template"), dict) or not spec["template"]:
        raise InvalidInputError(
            'a template spec is {"template": {field: "text with {name}", ...}, "values": {name: [...], ...}}',
            param="template",
        )
    template: dict[str, Any] = spec["template"]
    values = spec.get("values", {})
    if not isinstance(values, dict):
        raise InvalidInputError('"values" must map placeholder names to lists of values', param="values")
    names = list(values)
    for name in names:
        options = values[name]
        if not isinstance(options, list) or not options:
            raise InvalidInputError(f"the values of {name!r} must be a non-empty list", param="values")
        for option in options:
            if isinstance(option, bool) or not isinstance(option, str | int | float):
                raise InvalidInputError(
                    f"the values of {name!r} must be strings or numbers, not {type(option).__name__}", param="values"
                )
    used: set[str] = set()
    _placeholders(template, "template", used)
    unknown = sorted(used - set(names))
    if unknown:
        raise InvalidInputError(
            f"the template uses placeholders without values: {', '.join(unknown)}; values are given for: "
            f"{', '.join(names) or 'none'}",
            param="values",
        )
    unused = [name for name in names if name not in used]
    if unused:
        raise InvalidInputError(
            f"values are given for names the template never uses: {', '.join(unused)}", param="values"
        )
    total = math.prod(len(values[name]) for name in names)
    if total > MAX_EXPANDED_ROWS:
        raise InvalidInputError(
            f"the template expands to {total} rows, more than the limit of {MAX_EXPANDED_ROWS}", param="values"
        )
    rows: list[Row] = []
    for combination in itertools.product(*(values[name] for name in names)):
        binding = {name: str(value) for name, value in zip(names, combination, strict=True)}
        row = _render(template, binding)
        if not rows:
            check_row(row, "the rendered template")
        rows.append(row)
    return rows


# --- rewriting prompts ------------------------------------------------------------------------------------------------


def _rewritable_shape(rows: list[Row], what: str) -> str:
    shape = dataset_shape(rows)
    if shape == "text":
        raise InvalidInputError(f"{what} rewrites prompts, so it needs completion or chat rows; these rows are text")
    return shape


def _last_user(row: Row) -> int | None:
    for index in range(len(row["messages"]) - 1, -1, -1):
        if row["messages"][index]["role"] == "user":
            return index
    return None


def _prompt_of(row: Row, shape: str) -> str | None:
    if shape == "completion":
        return str(row["prompt"])
    index = _last_user(row)
    return None if index is None else str(row["messages"][index]["content"])


def _with_prompt(row: Row, shape: str, prompt: str, how: str) -> Row:
    new = dict(row)
    if shape == "completion":
        new["prompt"] = prompt
    else:
        index = _last_user(row)
        assert index is not None
        messages = [dict(m) for m in row["messages"]]
        messages[index]["content"] = prompt
        new["messages"] = messages
    new["augmented"] = how
    return new


def augment_rules(rows: list[Row], *, templates: list[str]) -> tuple[list[Row], dict[str, Any]]:
    """Keep each row and add one rewritten-prompt variant per template right after it; see the module docstring."""
    shape = _rewritable_shape(rows, "augment_rules")
    if not templates:
        raise InvalidInputError("give at least one question template, like 'Q: {prompt}'", param="templates")
    parsed: list[list[tuple[str, str | None]]] = []
    for i, template in enumerate(templates):
        if not isinstance(template, str):
            raise InvalidInputError(f"template {i} is a {type(template).__name__}, not a string", param="templates")
        pieces = _parse(template, f"template {i} ({template!r})")
        names = {name for _, name in pieces if name is not None}
        if names != {"prompt"}:
            raise InvalidInputError(
                f"template {i} ({template!r}) must use the placeholder {{prompt}} and no other; it uses "
                f"{sorted(names) or 'none'}",
                param="templates",
            )
        parsed.append(pieces)
    out: list[Row] = []
    per_template = [0] * len(templates)
    for row in rows:
        out.append(dict(row))
        prompt = _prompt_of(row, shape)
        if prompt is None:
            continue
        made = {prompt}
        for i, pieces in enumerate(parsed):
            variant = "".join(literal + (prompt if name else "") for literal, name in pieces)
            if variant in made:
                continue
            made.add(variant)
            out.append(_with_prompt(row, shape, variant, "rule"))
            per_template[i] += 1
    report: dict[str, Any] = {
        "rows_in": len(rows),
        "rows_out": len(out),
        "added": len(out) - len(rows),
        "per_template": dict(zip(templates, per_template, strict=True)),
    }
    return out, report


# --- model paraphrases ------------------------------------------------------------------------------------------------

_LEAD_IN = re.compile(r"^(?:sure|okay|ok|certainly|here)\b.*:\s*$", re.IGNORECASE)
_LABEL = re.compile(
    r"^(?:(?:the\s+)?(?:rewritten|paraphrased|reworded|new)(?:\s+(?:question|version|prompt))?|question|paraphrase|q)"
    r"\s*[:\-–]\s*",
    re.IGNORECASE,
)
_LIST_MARK = re.compile(r"^(?:\d+[.)]|[-*•])\s+")
_QUOTES = "\"'`“”‘’«»„"


def clean_paraphrase(output: str) -> str:
    """The paraphrase in a model's reply: its first meaningful line without labels, list marks or quotes."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    if len(lines) > 1 and _LEAD_IN.match(lines[0]):
        lines = lines[1:]
    if not lines:
        return ""
    text = lines[0]
    for _ in range(3):
        before = text
        text = _LIST_MARK.sub("", text)
        text = _LABEL.sub("", text)
        text = text.strip().strip(_QUOTES).strip()
        if text == before:
            break
    return text


def _canonical(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def paraphrase(
    rows: list[Row], generate: Callable[[list[str]], Sequence[str]], *, variants: int = 1
) -> tuple[list[Row], dict[str, Any]]:
    """Append model paraphrases of each row's prompt; see the module docstring."""
    shape = _rewritable_shape(rows, "paraphrase")
    if isinstance(variants, bool) or not isinstance(variants, int) or variants < 1:
        raise InvalidInputError(f"variants must be a positive integer, not {variants!r}", param="variants")
    sources: list[tuple[int, str]] = []
    for index, row in enumerate(rows):
        prompt = _prompt_of(row, shape)
        if prompt is not None and prompt.strip():
            sources.append((index, prompt))
    instructions = [f"{PARAPHRASE_INSTRUCTION}\n\n{prompt}" for _, prompt in sources]
    rejected = {"empty": 0, "identical": 0, "too_long": 0, "duplicate": 0}
    seen: list[set[str]] = [{_canonical(prompt)} for _, prompt in sources]
    added: list[Row] = []
    calls = 0
    for _ in range(variants if instructions else 0):
        outputs = list(generate(list(instructions)))
        calls += 1
        if len(outputs) != len(instructions):
            raise InvalidInputError(
                f"generate returned {len(outputs)} outputs for {len(instructions)} instructions", param="generate"
            )
        for (index, prompt), output, known in zip(sources, outputs, seen, strict=True):
            text = clean_paraphrase(output if isinstance(output, str) else "")
            canonical = _canonical(text)
            if not canonical:
                rejected["empty"] += 1
            elif canonical == _canonical(prompt):
                rejected["identical"] += 1
            elif len(text) > MAX_PARAPHRASE_RATIO * max(len(prompt), 1):
                rejected["too_long"] += 1
            elif canonical in known:
                rejected["duplicate"] += 1
            else:
                known.add(canonical)
                added.append(_with_prompt(rows[index], shape, text, "model"))
    out = [dict(row) for row in rows] + added
    report: dict[str, Any] = {
        "rows_in": len(rows),
        "rows_out": len(out),
        "prompts": len(sources),
        "requested": len(sources) * variants,
        "added": len(added),
        "rejected": rejected,
        "calls": calls,
    }
    return out, report
