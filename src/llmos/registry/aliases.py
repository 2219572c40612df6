"""Aliases: tags such as ``prod`` that deployments follow, with their history and rollback.

Contract: an alias is an ordinary tag (``name:prod``); every move of any tag is recorded by the registry in
``tag_history`` with the version it now names, the one it named before and a reason. :func:`history` lists those moves,
newest first. :func:`rollback` moves the alias back to the version it named before its current one (or to an explicit
digest from its history), recording the move with reason ``rollback``; the versions a tag's recent history names are
kept by the registry even when no tag points at them any more, so the target still exists. A running server follows
the move at its next request: names are resolved per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from llmos.errors import ConflictError, InvalidInputError, ModelNotFoundError
from llmos.registry.names import DEFAULT_TAG, parse_ref
from llmos.registry.service import Registry
from llmos.registry.views import VersionView
from llmos.store.schema import Model, ModelVersion, TagHistory, as_utc


@dataclass
class AliasMove:
    name: str
    digest: str
    previous_digest: str | None
    reason: str
    when: datetime
    exists: bool
    """Whether the version is still in the store (a rollback target must be)."""

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "when": self.when.isoformat()}


def _alias(name: str) -> tuple[str, str]:
    ref = parse_ref(name)
    if ref.digest:
        raise InvalidInputError("an alias is a name with a :tag, not a digest", param="name")
    return ref.repository, ref.tag or DEFAULT_TAG


def history(registry: Registry, name: str) -> list[AliasMove]:
    """The recorded moves of the tag ``name`` (``repository:tag``), newest first."""
    repository, tag = _alias(name)
    ref = parse_ref(repository)
    with registry.session() as session:
        model = session.scalar(select(Model).where(Model.namespace == ref.namespace, Model.name == ref.name))
        if model is None:
            raise ModelNotFoundError(f"model {repository!r} not found; `llmos list` shows what is available")
        rows = session.scalars(
            select(TagHistory)
            .where(TagHistory.model_id == model.id, TagHistory.tag == tag)
            .order_by(TagHistory.id.desc())
        ).all()
        present = set(session.scalars(select(ModelVersion.digest).where(ModelVersion.model_id == model.id)))
        return [
            AliasMove(
                f"{repository}:{tag}",
                row.digest,
                row.previous_digest,
                row.reason,
                as_utc(row.created_at),
                row.digest in present,
            )
            for row in rows
        ]


def move(registry: Registry, source: str, alias: str, *, reason: str) -> VersionView:
    """Point ``alias`` at the version ``source`` resolves to (a tag move with a reason in the history)."""
    _alias(alias)
    return registry.tag(source, alias, reason=reason)


def rollback(registry: Registry, name: str, *, to: str | None = None, reason: str = "rollback") -> VersionView:
    """Move the alias ``name`` back to the version it named before its current one, or to digest ``to``."""
    repository, tag = _alias(name)
    current = registry.show(f"{repository}:{tag}")
    moves = history(registry, name)
    if to is not None:
        wanted = to if to.startswith("sha256:") else f"sha256:{to}"
        matches = [m for m in moves if m.digest.startswith(wanted)]
        if not matches:
            raise InvalidInputError(f"{to!r} is not in the history of {repository}:{tag} (`llmos history`)", param="to")
        target = matches[0]
    else:
        last = next((m for m in moves if m.digest == current.digest), None)
        if last is None or last.previous_digest is None:
            raise ConflictError(f"{repository}:{tag} has no earlier version to roll back to")
        target = AliasMove(name, last.previous_digest, None, "", last.when, True)
    try:
        return registry.tag(f"{repository}@{target.digest}", f"{repository}:{tag}", reason=reason)
    except ModelNotFoundError as exc:
        raise ConflictError(f"version {target.digest[:19]} of {repository} is no longer in the store") from exc
