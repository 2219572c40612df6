"""``llmos prune``: a pruned child version of a registered Hugging Face (safetensors) model, with lineage.

Contract: :func:`prune` checks the arguments (method, sparsity in (0, 1)) and the parent (a registered ``hf`` model
of a Llama-family architecture; a GGUF model is refused with the ``llmos convert`` command that makes a copy that
can be pruned) before loading anything, prunes it with :func:`llmos.compression.prune.prune_hf_dir` and registers
the result through :func:`llmos.registry.derive.derive` (a private scratch directory; the parent's tenant and
encryption carry over) under the target name (default ``REPOSITORY:pruned-METHOD-PERCENT``) with a ``prune`` lineage
record whose params hold the method, the requested and achieved sparsity, the parameter counts before and after, the
intermediate sizes and the parent's size. The parent's chat template is kept. Structured pruning measures channel
importance on calibration text: llmos's own (:data:`llmos.compression.calibration.CALIBRATION_TEXTS`) unless
``calibration`` names a registered dataset (its first :data:`CALIBRATION_ROWS` rows, grouped :data:`ROWS_PER_TEXT`
to a text; the dataset is then a parent too, for lineage, owner and encryption).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmos.compression.calibration import CALIBRATION_TEXTS
from llmos.compression.prune import check_method, check_model_type, check_sparsity, prune_hf_dir
from llmos.errors import InvalidInputError
from llmos.registry.derive import derive
from llmos.registry.names import parse_ref
from llmos.registry.service import ProgressFactory, Registry, ResolvedModel
from llmos.registry.views import VersionView

CALIBRATION_ROWS = 256
ROWS_PER_TEXT = 16


def row_text(row: dict[str, Any]) -> str:
    """The text of a dataset row: ``text``, ``prompt`` + ``completion`` or the joined message contents."""
    if isinstance(row.get("text"), str):
        return str(row["text"])
    if isinstance(row.get("prompt"), str):
        return f"{row['prompt']}\n{row.get('completion') or ''}"
    messages = row.get("messages")
    if not isinstance(messages, list):
        return ""
    return "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))


def default_prune_name(repository: str, method: str, sparsity: float) -> str:
    return f"{repository}:pruned-{method}-{round(sparsity * 100)}"


def check_prunable(view: VersionView) -> None:
    """Refuse a version that is not a Llama-family Hugging Face model, saying what to do instead."""
    if view.format == "gguf":
        raise InvalidInputError(
            f"{view.name} is a GGUF model; pruning works on safetensors models:"
            f" run `llmos convert {view.name} --name {view.repository}:safetensors` first and prune that",
            param="model",
        )
    if view.format != "hf":
        kind = "a dataset" if view.format == "dataset" else f"a {view.format} model"
        raise InvalidInputError(f"{view.name} is {kind}; pruning works on safetensors (Hugging Face) models")
    check_model_type(view.details.get("model_type"), view.name)


def prune(
    registry: Registry,
    name: str,
    *,
    method: str,
    sparsity: float,
    target: str | None = None,
    calibration: str | None = None,
    progress: ProgressFactory | None = None,
    tenant_id: int | None = None,
) -> VersionView:
    """Prune registered model ``name`` and register the child; returns the child's view."""
    method = check_method(method)
    sparsity = check_sparsity(sparsity)
    if target is not None:
        parse_ref(target)
    texts: tuple[str, ...] = CALIBRATION_TEXTS
    extra: dict[str, object] = {"calibration": "llmos" if method == "structured" else None}
    parents: list[VersionView | ResolvedModel] = []
    if calibration is not None:
        from llmos.registry.datasets import load_rows

        if method != "structured":
            raise InvalidInputError("--calibration applies only to --method structured", param="calibration")
        data_view, rows = load_rows(registry, calibration)
        lines = [text for row in rows[:CALIBRATION_ROWS] if (text := row_text(row)).strip()]
        texts = tuple("\n\n".join(lines[i : i + ROWS_PER_TEXT]) for i in range(0, len(lines), ROWS_PER_TEXT))
        extra = {"calibration": data_view.name, "calibration_digest": data_view.digest}
        parents.append(data_view)  # its text chose the channels: a parent (owner, encryption, lineage)
    resolved = registry.resolve(name, verify=True)
    source = resolved.view
    check_prunable(source)
    target_name = target or default_prune_name(source.repository, method, sparsity)
    parse_ref(target_name)
    params: dict[str, Any] = {}

    def work(scratch: Path) -> Path:
        with registry.loadable_dir(resolved) as source_dir:
            result = prune_hf_dir(
                source_dir, scratch / "out", method=method, sparsity=sparsity, calibration_texts=texts
            )
        params.update({**result.to_dict(), **extra, "parent_size": source.size})
        return scratch / "out"

    return derive(
        registry,
        [resolved, *parents],
        work,
        target_name,
        operation="prune",
        params=params,  # filled in by the work
        tenant_id=tenant_id,
        chat_template=source.chat_template,
        progress=progress,
        prefix="prune-",
    )
