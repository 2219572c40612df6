"""Aliases: every tag move is in the history, moved-away versions stay for rollback, rollback moves back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmos.config import Settings
from llmos.errors import ConflictError, InvalidInputError
from llmos.registry import aliases
from llmos.registry.service import HISTORY_PER_TAG, Registry
from tests.helpers import gguf_bytes, run_cli


def _version(registry: Registry, tmp_path: Path, name: str, context: int) -> str:
    path = tmp_path / f"m{context}.gguf"
    path.write_bytes(
        gguf_bytes(metadata={"general.architecture": "llama", "llama.context_length": context, "general.file_type": 0})
    )
    return registry.import_path(path, name).digest


def test_alias_history_rollback_and_retention(tmp_path: Path) -> None:
    registry = Registry(Settings(home=tmp_path / "home"))
    first = _version(registry, tmp_path, "bot:v1", 128)
    second = _version(registry, tmp_path, "bot:v2", 256)
    aliases.move(registry, "bot:v1", "bot:prod", reason="release 1")
    aliases.move(registry, "bot:v2", "bot:prod", reason="release 2")
    registry.remove("bot:v1")  # the only tag on v1 goes; the version stays because prod's history names it
    assert registry.show("bot:prod").digest == second
    moves = aliases.history(registry, "bot:prod")
    assert [(m.digest, m.previous_digest, m.reason) for m in moves] == [
        (second, first, "release 2"),
        (first, None, "release 1"),
    ]
    assert all(m.exists for m in moves)

    back = aliases.rollback(registry, "bot:prod")
    assert back.digest == first == registry.show("bot:prod").digest
    assert aliases.history(registry, "bot:prod")[0].reason == "rollback"
    assert aliases.rollback(registry, "bot:prod").digest == second  # rolling back a rollback goes forward again
    assert aliases.rollback(registry, "bot:prod", to=first[7:19]).digest == first

    with pytest.raises(InvalidInputError, match="not in the history"):
        aliases.rollback(registry, "bot:prod", to="abcdef")
    with pytest.raises(InvalidInputError, match="not a digest"):
        aliases.history(registry, f"bot@{first}")
    registry.close()


def test_rollback_without_an_earlier_version_and_history_trimming(tmp_path: Path) -> None:
    registry = Registry(Settings(home=tmp_path / "home"))
    digests = [_version(registry, tmp_path, f"svc:v{i}", 64 * (i + 1)) for i in range(HISTORY_PER_TAG + 2)]
    aliases.move(registry, "svc:v0", "svc:prod", reason="first")
    with pytest.raises(ConflictError, match="no earlier version"):
        aliases.rollback(registry, "svc:prod")
    for i in range(1, len(digests)):
        aliases.move(registry, f"svc:v{i}", "svc:prod", reason=f"move {i}")
    for i in range(len(digests)):
        registry.remove(f"svc:v{i}")
    moves = aliases.history(registry, "svc:prod")
    assert len(moves) == HISTORY_PER_TAG
    kept = {m.digest for m in moves}
    with registry.session() as session:
        from sqlalchemy import select

        from llmos.store.schema import ModelVersion

        present = set(session.scalars(select(ModelVersion.digest)))
    assert present == kept  # versions that fell out of the history (and have no tag) were removed
    registry.remove("svc:prod")  # the last tag: the whole model goes
    with registry.session() as session:
        assert not list(session.scalars(select(ModelVersion.digest)))
    registry.close()


def test_history_and_rollback_cli(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for i, context in enumerate((128, 256)):
        path = tmp_path / f"c{i}.gguf"
        path.write_bytes(
            gguf_bytes(
                metadata={"general.architecture": "llama", "llama.context_length": context, "general.file_type": 0}
            )
        )
        assert run_cli(home, "import", str(path), "--name", f"app:v{i}").returncode == 0
        assert run_cli(home, "tag", f"app:v{i}", "app:prod").returncode == 0
    shown = json.loads(run_cli(home, "history", "app:prod", "--json").stdout)
    assert [m["reason"] for m in shown] == ["tag", "tag"]
    result = run_cli(home, "rollback", "app:prod", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["digest"] == shown[1]["digest"]
    bad = run_cli(home, "rollback", "nothere:prod")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "not found" in bad.stderr
