"""The HTTP side of the web console: its static shell, the identity and model routes it reads, and tagging."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from llmos.api.app import create_app
from llmos.config import Settings
from llmos.security.service import SecurityService


@pytest.fixture
def http(pulled_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(pulled_settings)) as client:
        yield client


def test_without_keys_the_console_needs_no_login_and_the_caller_is_the_local_admin(http: TestClient) -> None:
    assert http.get("/console/info.json").json()["auth_required"] is False
    assert http.get("/admin/me").json() == {"actor": "local", "tenant": "default", "role": "admin", "auth": False}
    index = http.get("/console/")
    assert index.status_code == 200 and index.headers["cache-control"] == "no-cache"
    assert http.get("/console", follow_redirects=False).headers["location"] == "/console/"
    assert http.get("/console/jobs/j123").text == index.text  # a client-side route reloaded in the browser
    assert http.get("/console/assets/nope.js").status_code == 404
    assert http.get("/console/%2e%2e/%2e%2e/pyproject.toml").status_code == 404  # never outside the static folder


def test_models_list_details_and_tagging(http: TestClient) -> None:
    names = [m["name"] for m in http.get("/admin/models").json()["data"]]
    assert "smollm2:latest" in names
    details = http.get("/admin/models/smollm2").json()
    assert details["format"] == "gguf" and details["graph"]["nodes"][0]["name"] == "smollm2:latest"
    assert details["graph"]["edges"] == [] and details["compression"] is None

    tagged = http.post("/admin/models/tag", json={"source": "smollm2", "target": "console-api:prod"})
    assert tagged.status_code == 200, tagged.text
    assert tagged.json()["digest"] == details["digest"]
    history = http.get("/admin/models/console-api:prod/history").json()["data"]
    assert history and history[0]["reason"].startswith("tag")
    assert http.get("/admin/models/console-api:prod").json()["digest"] == details["digest"]

    missing = http.get("/admin/models/no-such-model")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    bad = http.post("/admin/models/tag", json={"source": "smollm2", "target": "x@sha256:00"})
    assert bad.status_code in (400, 409) and "error" in bad.json()
    extra = http.post("/admin/models/tag", json={"source": "smollm2", "target": "a:b", "force": True})
    assert extra.status_code == 400


def test_with_keys_data_needs_a_key_and_tagging_needs_an_admin(pulled_settings: Settings, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    settings = pulled_settings.model_copy(update={"home": tmp_path_factory.mktemp("console-keys") / "home"})
    security = SecurityService(settings)
    security.create_tenant("acme")
    developer, _ = security.create_key("acme", "developer")
    security.close()
    with TestClient(create_app(settings)) as http:
        assert http.get("/console/").status_code == 200  # the shell is public: it holds no data
        assert http.get("/console/info.json").json()["auth_required"] is True
        assert http.get("/admin/me").status_code == 401
        auth = {"authorization": f"Bearer {developer}"}
        me = http.get("/admin/me", headers=auth).json()
        assert me["role"] == "developer" and me["tenant"] == "acme" and me["auth"] is True
        refused = http.post("/admin/models/tag", json={"source": "smollm2", "target": "x:y"}, headers=auth)
        assert refused.status_code == 403
