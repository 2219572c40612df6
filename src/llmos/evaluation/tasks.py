"""Evaluation tasks: the built-in ones, custom tasks from a small YAML file, and the items they make of dataset rows.

Contract:

* Built-in tasks (:data:`BUILTIN_TASKS`): ``perplexity`` (see :mod:`llmos.evaluation.perplexity`), the generation
  tasks ``bleu``, ``chrf``, ``rouge`` and ``exact_match`` (each named after its metric) and ``multiple_choice``
  (metric ``accuracy``). Their prompts come from the row's shape: a completion row's ``prompt`` (reference: its
  ``completion``), or a chat row's turns before its last assistant turn (reference: that turn). A multiple-choice row
  is ``{"question" or "prompt": str, "choices": [str, ...], "answer": index or choice text}`` (without ``answer``,
  a completion row's ``completion`` names the right choice).
* A custom task is a YAML mapping (:func:`load_task_file`, :func:`parse_task`) with the fields ``name``, ``type``
  (generate | multiple_choice), ``prompt`` (a template whose ``{field}`` placeholders are filled from the row;
  ``{{`` and ``}}`` are literal braces), ``reference`` (the row field holding the answer), ``metric``
  (bleu | chrf | rouge | exact_match for generate, accuracy for multiple_choice), ``choices`` (the row field
  holding the choices; multiple_choice only) and optionally ``max_tokens``, ``stop`` (a string or a list) and
  ``chat`` (render the prompt as a user turn with the model's chat template; default: when the model has one).
  A missing or unknown field, a value of the wrong type, an unknown metric or a template that does not parse is an
  :class:`~llmos.errors.InvalidInputError` naming the field. Placeholders are plain field names only (no
  attribute or index access: a template can read nothing but the row's own fields).
* :func:`make_items` turns rows into :class:`GenerateItem` or :class:`ChoiceItem`; a row without a field the task
  reads (a placeholder, the reference, the choices) or with an answer that is not one of its choices is an error
  naming the row and the field.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from llmos.errors import InvalidInputError
from llmos.evaluation.metrics import GENERATION_METRICS, METRICS, Reference
from llmos.types import ChatMessage

TASK_TYPES = ("generate", "multiple_choice")
BUILTIN_TASKS = ("perplexity", *GENERATION_METRICS, "multiple_choice")
REQUIRED_FIELDS = ("name", "type", "prompt", "reference", "metric")
OPTIONAL_FIELDS = ("choices", "max_tokens", "stop", "chat", "description")
DEFAULT_MAX_TOKENS = 64
MAX_TASK_FILE_BYTES = 64 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

Prompt = str | tuple[ChatMessage, ...]
"""A plain prompt (sent raw, or as one user turn with the chat template) or explicit chat turns."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    type: str
    metric: str
    prompt: str | None = None
    """Template over the row's fields; None: the prompt comes from the row's shape (built-in tasks)."""
    reference: str | None = None
    choices: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    stop: tuple[str, ...] = ()
    chat: bool | None = None
    """None: use the chat template when the model has one."""
    custom: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop"] = list(self.stop)
        return data

    def fields(self) -> dict[str, Any]:
        """A custom task as the mapping :func:`parse_task` reads back (to hand it to a job)."""
        data = {k: v for k, v in self.to_dict().items() if k in REQUIRED_FIELDS + OPTIONAL_FIELDS}
        return {k: v for k, v in data.items() if v is not None and v != []}


@dataclass(frozen=True)
class GenerateItem:
    prompt: Prompt
    reference: Reference


@dataclass(frozen=True)
class ChoiceItem:
    prompt: Prompt
    choices: tuple[str, ...]
    answer: int


def builtin_task(name: str, *, max_tokens: int | None = None) -> TaskSpec:
    if name not in BUILTIN_TASKS or name == "perplexity":
        raise InvalidInputError(
            f"unknown task {name!r}; tasks: {', '.join(BUILTIN_TASKS)}, or a task YAML file", param="task"
        )
    if max_tokens is not None and not 1 <= max_tokens <= 4096:
        raise InvalidInputError("max_tokens must be between 1 and 4096", param="max_tokens")
    if name == "multiple_choice":
        return TaskSpec(name=name, type="multiple_choice", metric="accuracy")
    return TaskSpec(name=name, type="generate", metric=name, max_tokens=max_tokens or DEFAULT_MAX_TOKENS)


def template_fields(template: str, param: str = "prompt") -> list[str]:
    """The placeholder names of a ``{field}`` template; anything but plain names is refused."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InvalidInputError(f"task field {param!r}: the template does not parse ({exc})", param=param) from exc
    names = []
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise InvalidInputError(
                f"task field {param!r}: placeholder {shown} is not a plain field name like {{question}}",
                param=param,
            )
        names.append(name)
    return names


def render_template(template: str, row: Mapping[str, Any], index: int, param: str = "prompt") -> str:
    parts = []
    for literal, name, _spec, _conversion in string.Formatter().parse(template):
        parts.append(literal)
        if name is None:
            continue
        if name not in row:
            raise InvalidInputError(
                f"row {index} has no field {name!r}, which the task's {param} template uses"
                f" (the row has: {', '.join(sorted(map(str, row)))})",
                param=param,
            )
        value = row[name]
        parts.append(value if isinstance(value, str) else str(value))
    return "".join(parts)


def _string(raw: Mapping[str, Any], key: str, *, required: bool = True) -> str | None:
    value = raw.get(key)
    if value is None:
        if required:
            raise InvalidInputError(f"the task has no {key!r} field", param=key)
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(f"task field {key!r} must be a non-empty string", param=key)
    return value


def parse_task(raw: object, where: str = "the task") -> TaskSpec:
    """Validate a custom task mapping (from YAML or JSON)."""
    if not isinstance(raw, Mapping):
        raise InvalidInputError(f"{where} must be a mapping of task fields ({', '.join(REQUIRED_FIELDS)}, ...)")
    unknown = sorted(str(k) for k in raw if k not in REQUIRED_FIELDS + OPTIONAL_FIELDS)
    if unknown:
        raise InvalidInputError(
            f"{where} has unknown field(s) {', '.join(map(repr, unknown))}; fields:"
            f" {', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)}",
            param=unknown[0],
        )
    for key in REQUIRED_FIELDS:
        if key not in raw or raw[key] is None:
            raise InvalidInputError(f"{where} has no {key!r} field (required: {', '.join(REQUIRED_FIELDS)})", param=key)
    name = _string(raw, "name")
    assert name is not None
    if not _NAME.match(name):
        raise InvalidInputError(
            f"task field 'name' {name!r} must be 1-64 letters, digits, '.', '_' or '-'", param="name"
        )
    if name in BUILTIN_TASKS:
        raise InvalidInputError(f"task field 'name' {name!r} is a built-in task; choose another name", param="name")
    task_type = _string(raw, "type")
    if task_type not in TASK_TYPES:
        raise InvalidInputError(
            f"task field 'type' must be one of {', '.join(TASK_TYPES)}, not {task_type!r}", param="type"
        )
    metric = _string(raw, "metric")
    if metric not in METRICS:
        raise InvalidInputError(
            f"task field 'metric' must be one of {', '.join(METRICS)}, not {metric!r}", param="metric"
        )
    if task_type == "multiple_choice" and metric != "accuracy":
        raise InvalidInputError("a multiple_choice task is scored with metric 'accuracy'", param="metric")
    if task_type == "generate" and metric not in GENERATION_METRICS:
        raise InvalidInputError(
            f"a generate task is scored with {', '.join(GENERATION_METRICS)}, not {metric!r}", param="metric"
        )
    prompt = _string(raw, "prompt")
    assert prompt is not None
    if not template_fields(prompt):
        raise InvalidInputError("task field 'prompt' uses no {field} of the row", param="prompt")
    reference = _string(raw, "reference")
    choices = _string(raw, "choices", required=task_type == "multiple_choice")
    if choices is not None and task_type != "multiple_choice":
        raise InvalidInputError("task field 'choices' is for multiple_choice tasks only", param="choices")
    max_tokens = raw.get("max_tokens", DEFAULT_MAX_TOKENS)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= 4096:
        raise InvalidInputError("task field 'max_tokens' must be an integer between 1 and 4096", param="max_tokens")
    stop_raw = raw.get("stop") or []
    stop = [stop_raw] if isinstance(stop_raw, str) else stop_raw
    if not isinstance(stop, list) or len(stop) > 8 or not all(isinstance(s, str) and s for s in stop):
        raise InvalidInputError("task field 'stop' must be a string or a list of up to 8 strings", param="stop")
    chat = raw.get("chat")
    if chat is not None and not isinstance(chat, bool):
        raise InvalidInputError("task field 'chat' must be true or false", param="chat")
    description = raw.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidInputError("task field 'description' must be a string", param="description")
    return TaskSpec(
        name=name, type=task_type, metric=metric, prompt=prompt, reference=reference, choices=choices,
        max_tokens=max_tokens, stop=tuple(stop), chat=chat, custom=True,
    )  # fmt: skip


def load_task_file(path: Path) -> TaskSpec:
    if not path.is_file():
        raise InvalidInputError(f"task file {path} does not exist", param="task")
    if path.stat().st_size > MAX_TASK_FILE_BYTES:
        raise InvalidInputError(f"task file {path} is larger than {MAX_TASK_FILE_BYTES} bytes", param="task")
    import yaml  # type: ignore[import-untyped]

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"task file {path} is not valid YAML: {exc}", param="task") from exc
    return parse_task(raw, f"task file {path}")


def is_task_file(task: str) -> bool:
    return task.endswith((".yaml", ".yml", ".json")) or "/" in task


def resolve_task(task: str, *, max_tokens: int | None = None) -> TaskSpec | None:
    """The spec of ``task`` (a built-in name or a YAML file); None for perplexity."""
    if task == "perplexity":
        return None
    if is_task_file(task):
        spec = load_task_file(Path(task))
        if max_tokens is not None:
            spec = replace(spec, max_tokens=max_tokens)
        return spec
    return builtin_task(task, max_tokens=max_tokens)


# --- rows -> items --------------------------------------------------------------------------------------------------


def _row_prompt(row: Mapping[str, Any], index: int, task: str) -> tuple[Prompt, str]:
    """Prompt and reference of a completion or chat row (built-in generation tasks)."""
    messages = row.get("messages")
    if isinstance(messages, list) and messages:
        roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
        last = max((i for i, role in enumerate(roles) if role == "assistant"), default=-1)
        if last <= 0:
            raise InvalidInputError(
                f"row {index} is a chat row without an assistant turn after the prompt; task {task!r} needs one as"
                " the reference",
                param="data",
            )
        turns = tuple(ChatMessage(str(m["role"]), str(m["content"])) for m in messages[:last])  # type: ignore[arg-type]
        return turns, str(messages[last]["content"])
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return str(row["prompt"]), str(row["completion"])
    raise InvalidInputError(
        f"row {index} has fields {sorted(map(str, row))}; task {task!r} needs prompt/completion or chat rows"
        " (or a task YAML naming the fields)",
        param="data",
    )


def _field(row: Mapping[str, Any], name: str, index: int, param: str) -> Any:
    if name not in row:
        raise InvalidInputError(
            f"row {index} has no field {name!r} (the task's {param}); the row has: {', '.join(sorted(map(str, row)))}",
            param=param,
        )
    return row[name]


def _reference(value: Any, index: int) -> Reference:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise InvalidInputError(f"row {index}: the reference must be a string or a list of strings", param="reference")


def _choices(value: Any, index: int) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str | int | float) for v in value):
        raise InvalidInputError(f"row {index}: the choices must be a list of at least two strings", param="choices")
    return tuple(str(v) for v in value)


def _answer(value: Any, choices: tuple[str, ...], index: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(choices):
            return value
        raise InvalidInputError(
            f"row {index}: answer index {value} is outside its {len(choices)} choices", param="reference"
        )
    if isinstance(value, str):
        if value in choices:
            return choices.index(value)
        from llmos.evaluation.metrics import normalize_answer

        normalized = [normalize_answer(c) for c in choices]
        if normalize_answer(value) in normalized:
            return normalized.index(normalize_answer(value))
    raise InvalidInputError(
        f"row {index}: the answer {value!r} is neither an index nor one of the choices {list(choices)}",
        param="reference",
    )


def make_items(spec: TaskSpec, rows: Sequence[Mapping[str, Any]]) -> list[GenerateItem] | list[ChoiceItem]:
    if not rows:
        raise InvalidInputError("the dataset (or the chosen split) has no rows to evaluate", param="data")
    if spec.type == "generate":
        generate: list[GenerateItem] = []
        for index, row in enumerate(rows):
            if spec.prompt is None:
                prompt, reference = _row_prompt(row, index, spec.name)
                generate.append(GenerateItem(prompt, reference))
            else:
                assert spec.reference is not None
                text = render_template(spec.prompt, row, index)
                generate.append(GenerateItem(text, _reference(_field(row, spec.reference, index, "reference"), index)))
        return generate
    choice_items: list[ChoiceItem] = []
    for index, row in enumerate(rows):
        if spec.prompt is None:
            question = row.get("question", row.get("prompt"))
            if not isinstance(question, str):
                raise InvalidInputError(f"row {index} has no 'question' (or 'prompt') string", param="data")
            choices = _choices(_field(row, "choices", index, "choices"), index)
            answer_field = "answer" if "answer" in row else "completion"
            answer = _answer(_field(row, answer_field, index, "reference"), choices, index)
            choice_items.append(ChoiceItem(question, choices, answer))
        else:
            assert spec.reference is not None and spec.choices is not None
            text = render_template(spec.prompt, row, index)
            choices = _choices(_field(row, spec.choices, index, "choices"), index)
            answer = _answer(_field(row, spec.reference, index, "reference"), choices, index)
            choice_items.append(ChoiceItem(text, choices, answer))
    return choice_items
