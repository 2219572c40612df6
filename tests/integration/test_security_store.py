"""Key handling, encryption at rest and HTTP hardening, below the full server."""

from __future__ import annotations

import hmac
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from llmos.config import Settings
from llmos.errors import AuthenticationError, IntegrityError, PermissionDeniedError
from llmos.registry.service import Registry
from llmos.security import service as security_module
from llmos.security.principal import Principal
from llmos.security.service import SecurityService
from tests.helpers import ServerProcess, gguf_bytes
from tests.postgres import DATABASES

on_both_databases = pytest.mark.parametrize("database", DATABASES, indirect=True)
"""The store tests run on SQLite and PostgreSQL; the HTTP hardening below needs no store and runs once."""


@on_both_databases
def test_key_comparison_is_constant_time(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    security = SecurityService(settings)
    security.create_tenant("t")
    key, _ = security.create_key("t", "consumer")
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def recording(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security_module.hmac, "compare_digest", recording)
    assert security.authenticate(f"Bearer {key}").tenant == "t"
    for wrong in (key[:-1] + ("A" if key[-1] != "A" else "B"), "llmos_ffffffffffff_" + "x" * 43, "garbage"):
        with pytest.raises(AuthenticationError):
            security.authenticate(f"Bearer {wrong}")
    assert len(calls) == 4  # every path, known prefix or not, goes through the constant-time comparison
    security.close()


@on_both_databases
def test_roles_cannot_mint_higher_roles(settings: Settings) -> None:
    security = SecurityService(settings)
    security.create_tenant("t")
    security.create_tenant("u")
    developer = Principal(tenant="t", tenant_id=security.tenant_id("t"), role="developer", key_prefix="p")
    with pytest.raises(PermissionDeniedError):
        security.create_key("t", "admin", creator=developer)
    with pytest.raises(PermissionDeniedError):
        security.create_key("u", "consumer", creator=developer)
    key, info = security.create_key("t", "consumer", creator=developer)
    assert info.role == "consumer" and key.startswith("llmos_")
    security.close()


@on_both_databases
def test_adapters_are_encrypted_at_rest_and_a_wrong_key_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database: str
) -> None:
    home = tmp_path / "home"
    settings = Settings(home=home, encryption_key=os.urandom(32).hex())
    registry = Registry(settings)
    base = tmp_path / "base"
    base.mkdir()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    (base / "config.json").write_text(json.dumps(config))
    save_file({"model.embed_tokens.weight": np.zeros((4, 8), dtype=np.float32)}, str(base / "model.safetensors"))
    registry.import_path(base, "base")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    secret = np.arange(16, dtype=np.float32).reshape(2, 8) + 0.123
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": secret,
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((8, 2), dtype=np.float32),
        },
        str(adapter / "adapter_model.safetensors"),
    )  # fmt: skip
    view = registry.import_path(adapter, "my-adapter", base="base")
    weights = next(f for f in view.files if f.path == "adapter_model.safetensors")
    stored = registry.blobs.path(weights.digest).read_bytes()
    assert secret.tobytes() not in stored and stored.startswith(b"LLMOSENC1\n")
    assert registry.verify().ok
    resolved = registry.resolve("my-adapter", verify=True)
    with registry.loadable_dir(resolved) as directory:
        assert (directory / "adapter_model.safetensors").read_bytes() == (
            adapter / "adapter_model.safetensors"
        ).read_bytes()
        assert oct((directory / "adapter_model.safetensors").stat().st_mode & 0o777) == "0o600"
    assert not directory.exists()  # the plaintext copy is gone after loading
    plain_base = registry.resolve("base")
    assert not registry.blobs.is_encrypted(plain_base.view.files[0].digest)  # public weights stay as they are
    registry.close()

    wrong = Registry(Settings(home=home, encryption_key=os.urandom(32).hex()))
    with (
        pytest.raises(IntegrityError, match="wrong LLMOS_ENCRYPTION_KEY"),
        wrong.loadable_dir(wrong.resolve("my-adapter")),
    ):
        pass
    assert not wrong.verify().ok
    missing = Registry(Settings(home=home))
    with (
        pytest.raises(IntegrityError, match="set LLMOS_ENCRYPTION_KEY"),
        missing.loadable_dir(missing.resolve("my-adapter")),
    ):
        pass


@pytest.fixture(scope="module")
def hardened(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    home = tmp_path_factory.mktemp("hardened") / "home"
    model = home.parent / "m.gguf"
    model.write_bytes(gguf_bytes())
    Registry(Settings(home=home)).import_path(model, "tiny")
    process = ServerProcess(home, env={"LLMOS_REQUEST_READ_SECONDS": "1"})
    yield process
    process.stop()


def test_oversized_headers_get_431(hardened: ServerProcess) -> None:
    import httpx

    response = httpx.get(f"{hardened.base}/v1/models", headers={f"x-filler-{i}": "y" * 500 for i in range(60)})
    assert response.status_code == 431


def test_a_slow_client_gets_408(hardened: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", hardened.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model":'
        )
        time.sleep(1.5)
        reply = sock.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 408")


def test_no_cors_by_default_and_security_headers(hardened: ServerProcess) -> None:
    import httpx

    preflight = httpx.options(
        f"{hardened.base}/v1/models",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in preflight.headers
    response = httpx.get(f"{hardened.base}/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
