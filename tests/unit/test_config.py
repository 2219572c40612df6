from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from llmos.config import Settings


def test_environment_overrides_and_home_layout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("LLMOS_THREADS", "3")
    settings = Settings()
    assert settings.home == tmp_path / "h"
    assert settings.threads == 3
    assert settings.db_path == tmp_path / "h" / "llmos.db"
    assert settings.blobs_dir == tmp_path / "h" / "blobs"
    assert settings.effective_database_url() == f"sqlite:///{tmp_path / 'h' / 'llmos.db'}"


def test_secrets_are_masked_and_every_field_is_documented() -> None:
    settings = Settings(database_url="postgresql://user:hunter2@localhost/db")
    rows = {row["name"]: row for row in settings.describe()}
    assert rows["database_url"]["value"] == "********"
    assert "hunter2" not in repr(rows)
    assert all(row["description"] and row["env"].startswith("LLMOS_") for row in rows.values())


def test_invalid_values_and_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(threads=0)
    with pytest.raises(ValidationError):
        Settings(no_such_setting=1)  # type: ignore[call-arg]


def test_speculative_is_auto_on_or_off_and_takes_boolean_spellings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().speculative == "auto"
    for value, expected in (("1", "on"), ("true", "on"), ("on", "on"), ("0", "off"), ("No", "off"), ("auto", "auto")):
        monkeypatch.setenv("LLMOS_SPECULATIVE", value)
        assert Settings().speculative == expected, value
    assert Settings(speculative=False).speculative == "off"
    with pytest.raises(ValidationError):
        Settings(speculative="sometimes")
