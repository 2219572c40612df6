"""Plain read-only views of registry objects, returned to the CLI, SDK and API.

Contract: views are detached from the database session and serialise to JSON with :meth:`to_dict`. Times are
timezone-aware UTC; ``digest`` is always the version's manifest digest (``sha256:`` of the manifest bytes) and each
file carries the digest of its own bytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from llmos.store.schema import ModelVersion, as_utc


@dataclass(frozen=True)
class FileView:
    path: str
    digest: str
    size: int


@dataclass(frozen=True)
class LineageView:
    operation: str
    parent_digest: str | None
    parent_name: str | None
    params: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class VersionView:
    name: str
    repository: str
    tag: str | None
    tags: list[str]
    digest: str
    format: str
    architecture: str | None
    parameter_count: int | None
    quantization: str | None
    context_length: int | None
    size: int
    created_at: datetime
    files: list[FileView]
    lineage: list[LineageView] = field(default_factory=list)
    chat_template: str | None = None
    tokenizer: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    manifest: str = ""
    tenant_id: int | None = None
    """Owning tenant (None = public)."""

    @property
    def short_digest(self) -> str:
        return self.digest.split(":", 1)[1][:12]

    def to_dict(self, *, full: bool = False) -> dict[str, Any]:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        data["lineage"] = [{**asdict(item), "created_at": item.created_at.isoformat()} for item in self.lineage]
        if not full:
            for key in ("chat_template", "tokenizer", "details", "manifest"):
                data.pop(key)
        return data


def version_view(version: ModelVersion, repository: str, tag: str | None) -> VersionView:
    tags = sorted(t.tag for t in version.model.tags if t.version_id == version.id)
    return VersionView(
        name=f"{repository}:{tag}" if tag else f"{repository}@{version.digest}",
        repository=repository,
        tag=tag,
        tags=tags,
        digest=version.digest,
        format=version.format,
        architecture=version.architecture,
        parameter_count=version.parameter_count,
        quantization=version.quantization,
        context_length=version.context_length,
        size=version.size,
        created_at=as_utc(version.created_at),
        files=[FileView(f.path, f.blob_digest, f.size) for f in version.files],
        lineage=[
            LineageView(lin.operation, lin.parent_digest, lin.parent_name, dict(lin.params), as_utc(lin.created_at))
            for lin in sorted(version.lineage, key=lambda lin: lin.id)  # insertion order on every database
        ],
        chat_template=version.chat_template,
        tokenizer=dict(version.tokenizer),
        details=dict(version.details),
        manifest=version.manifest,
        tenant_id=version.model.tenant_id,
    )


def canonical_json(value: Any) -> bytes:
    """The one byte encoding of a manifest: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
