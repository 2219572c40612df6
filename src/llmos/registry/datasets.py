"""Datasets in the registry: versioned, content-addressed rows with lineage and a report of every processing step.

Contract: a dataset version is a registry version of format ``dataset`` with one file, ``data.jsonl``, holding the
rows in canonical JSON Lines (keys sorted, UTF-8), so identical rows give the identical digest. Its details hold the
row count, the shape (``text``, ``completion`` or ``chat``), split counts when rows carry a ``split`` field, and the
report of the step that made it (rows in/out, why rows were dropped). Every processing step (:func:`store_rows` with
an ``operation``) records its parent dataset in the lineage. Dataset blobs are encrypted at rest when an encryption
key is configured. Names share the registry's grammar and namespace with models; a name is either a model or a
dataset, never both.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmos.data.readers import read_dataset
from llmos.data.rows import dataset_shape
from llmos.data.split import split as split_rows
from llmos.errors import InvalidInputError, ModelNotFoundError
from llmos.formats.info import ModelFile, ModelInfo
from llmos.registry.service import ParentRef, Registry
from llmos.registry.views import VersionView

DATA_FILE = "data.jsonl"


def is_dataset(view: VersionView) -> bool:
    return view.format == "dataset"


def show_dataset(registry: Registry, name: str) -> VersionView:
    view = registry.show(name)
    if not is_dataset(view):
        raise ModelNotFoundError(f"{name!r} is a model, not a dataset; `llmos data list` shows the datasets")
    return view


def store_rows(
    registry: Registry,
    rows: Sequence[dict[str, Any]],
    name: str,
    *,
    operation: str,
    report: dict[str, Any],
    parents: Sequence[ParentRef] = (),
    params: dict[str, Any] | None = None,
    tenant_id: int | None = None,
) -> VersionView:
    """Register ``rows`` as a new version of dataset ``name``."""
    shape = dataset_shape(list(rows))
    fields = sorted({key for row in rows for key in row})
    splits = Counter(str(row["split"]) for row in rows if "split" in row)
    scratch = registry.settings.home / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix="dataset-", suffix=".jsonl", dir=scratch)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        info = ModelInfo(
            format="dataset",
            files=[ModelFile(source=tmp, path=DATA_FILE, size=tmp.stat().st_size)],
            metadata={
                "rows": len(rows),
                "shape": shape,
                "fields": fields,
                "splits": dict(sorted(splits.items())),
                "report": report,
            },
        )
        return registry.import_info(
            info, name, operation=operation, parents=parents, params=params or {}, tenant_id=tenant_id
        )
    finally:
        tmp.unlink(missing_ok=True)


def import_dataset(
    registry: Registry,
    source: Path,
    name: str,
    *,
    on_error: str = "fail",
    text_mode: str = "line",
    tenant_id: int | None = None,
) -> VersionView:
    """Read a JSONL / CSV / text / Parquet file and register its rows as dataset ``name``."""
    rows, report = read_dataset(source, on_error=on_error, text_mode=text_mode)
    return store_rows(
        registry,
        rows,
        name,
        operation="import",
        report=report.as_dict(),
        params={"source": source.name, "on_error": on_error, "text_mode": text_mode},
        tenant_id=tenant_id,
    )


def load_rows(registry: Registry, name: str) -> tuple[VersionView, list[dict[str, Any]]]:
    """The rows of a dataset version, digest-verified and decrypted in memory."""
    view = show_dataset(registry, name)
    resolved = registry.resolve(view.name if view.tag else name, verify=True)
    file = next(f for f in resolved.view.files if f.path == DATA_FILE)
    data = b"".join(registry.blobs.read_chunks(file.digest))
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    return resolved.view, rows


def rows_of_split(rows: Sequence[dict[str, Any]], split: str | None) -> list[dict[str, Any]]:
    """Rows of one split (``None`` = all rows); an unknown split name is an error that lists the ones present."""
    if split is None:
        return list(rows)
    chosen = [row for row in rows if row.get("split") == split]
    if not chosen:
        present = sorted({str(row["split"]) for row in rows if "split" in row})
        raise InvalidInputError(
            f"the dataset has no rows in split {split!r}" + (f"; it has {', '.join(present)}" if present else ""),
            param="split",
        )
    return chosen


def parent_of(view: VersionView) -> ParentRef:
    return ParentRef(view.digest, view.name)


def training_rows(
    registry: Registry, data: str, validation: str | None, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[ParentRef], VersionView]:
    """Training rows, validation rows, the datasets as lineage parents, and the training dataset's view.

    Validation comes from the ``validation`` dataset (its ``validation`` split when its rows carry splits), else from
    the data's own ``validation`` split, else from a deterministic 10% of the rows held out with ``seed``. Training
    is the data's ``train`` split when its rows carry splits, else every row not held out.
    """
    data_view, rows = load_rows(registry, data)
    parents = [parent_of(data_view)]
    if validation:
        validation_view, validation_all = load_rows(registry, validation)
        parents.append(parent_of(validation_view))
        train = rows_of_split(rows, "train") if any("split" in r for r in rows) else rows
        has_split = any("split" in r for r in validation_all)
        held_out = rows_of_split(validation_all, "validation") if has_split else validation_all
    elif any(row.get("split") == "validation" for row in rows):
        train, held_out = rows_of_split(rows, "train"), rows_of_split(rows, "validation")
    else:
        parts, _ = split_rows(rows, fractions={"train": 0.9, "validation": 0.1}, seed=seed)
        train, held_out = parts["train"], parts["validation"]
    return train, held_out, parents, data_view
