"""Edge bundles end to end: `llmos export --target edge`, the bundle's runner in a fresh virtual environment that has
only llama-cpp-python (answering through the official `openai` client), tamper detection, and `llmos import` back."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from llmos.config import Settings
from llmos.errors import ConflictError, InvalidInputError
from llmos.registry.edge import export_bundle, import_bundle
from llmos.registry.service import Registry
from tests.helpers import free_port, run_cli

ROOT = Path(__file__).resolve().parents[2]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# what `pip install llama-cpp-python` brings along, and all that the fresh venv may hold
LLAMA_CPP_AND_DEPENDENCIES = {"llama_cpp_python", "numpy", "jinja2", "markupsafe", "diskcache", "typing_extensions"}


def clean_env() -> dict[str, str]:
    """The environment minus anything that would let the fresh venv see this one."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def pip_for(python: Path) -> list[str]:
    """This venv's pip, acting on another interpreter's environment."""
    return [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


@contextmanager
def running_bundle(
    bundle: Path, python: Path, tmp_path: Path, extra_env: dict[str, str] | None = None
) -> Iterator[tuple[str, Path]]:
    """The bundle's runner serving on a free loopback port (its fast-path verdict cached under ``tmp_path``)."""
    port = free_port()
    log_path = tmp_path / "runner.log"
    env = {**clean_env(), "XDG_CACHE_HOME": str(tmp_path / "cache"), **(extra_env or {})}
    with log_path.open("wb") as log:
        runner = subprocess.Popen(
            [str(python), str(bundle / "run_edge.py"), "--port", str(port), "--threads", "2", "--ctx", "1024"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                assert runner.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            yield base, log_path
        finally:
            runner.terminate()
            runner.wait(30)


@pytest.fixture(scope="module")
def bundle(pulled_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("edge") / "smollm2-edge"
    result = run_cli(pulled_settings.home, "export", "smollm2", "--target", "edge", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "run it with" in result.stderr
    return out


@pytest.fixture(scope="module")
def edge_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (without even pip) holding llama-cpp-python, installed by this venv's pip from the wheel the
    Makefile built (scripts/build_llama_cpp.sh; cached, so nothing compiles here), and its dependencies from the
    package index (pip's cache)."""
    wheels = subprocess.run(
        [str(ROOT / "scripts" / "build_llama_cpp.sh"), sys.executable],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    ).stdout.strip()
    wheel = next(Path(wheels).glob("llama_cpp_python-*.whl"))
    venv = tmp_path_factory.mktemp("edge-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60, env=clean_env())
    python = venv / "bin" / "python"
    install = subprocess.run(
        [*pip_for(python), "install", "--quiet", "--only-binary=:all:", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
        check=False,
    )
    assert install.returncode == 0, install.stderr
    return python


def test_bundle_files_match_the_manifest(bundle: Path, pulled_settings: Settings) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    listed = {entry["path"] for entry in manifest["files"]}
    assert {p.name for p in bundle.iterdir()} == listed | {"manifest.json"}
    assert {"model.gguf", "chat_template.json", "run_edge.py", "llamacpp_probe.py", "README.txt"} <= listed
    assert "requirements.txt" in listed
    for entry in manifest["files"]:
        data = (bundle / entry["path"]).read_bytes()
        assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"], entry["path"]
    registry = Registry(pulled_settings)
    source = registry.show("smollm2")
    registry.close()
    # a quantized GGUF is shipped as is: the very bytes the registry holds, with the registry's lineage
    assert f"sha256:{manifest['files'][0]['sha256']}" == source.files[0].digest
    assert manifest["source"]["digest"] == source.digest and manifest["export"]["operation"] == "copy"
    assert manifest["lineage"][0]["name"] == "smollm2:latest"
    assert manifest["lineage"][0]["lineage"][0]["operation"] == "pull"
    template = json.loads((bundle / "chat_template.json").read_text())
    assert template["template"] == source.chat_template  # llmos's curated ChatML, not the GGUF's own template


@pytest.mark.timeout(900)
def test_the_bundle_answers_paris_from_a_venv_with_only_llama_cpp(
    bundle: Path, edge_python: Path, pulled_settings: Settings, tmp_path: Path
) -> None:
    listed = subprocess.run(
        [*pip_for(edge_python), "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
    )
    installed = {item["name"].lower().replace("-", "_") for item in json.loads(listed.stdout)}
    assert installed == LLAMA_CPP_AND_DEPENDENCIES, installed  # not even pip
    no_llmos = subprocess.run(
        [str(edge_python), "-c", "import llmos"], capture_output=True, text=True, cwd=tmp_path, env=clean_env()
    )
    assert no_llmos.returncode != 0 and "No module named 'llmos'" in no_llmos.stderr

    with running_bundle(bundle, edge_python, tmp_path) as (base, _log):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["smollm2:latest"]
        answer = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=32)
        content = answer.choices[0].message.content or ""
        assert "Paris" in content, content
        assert answer.usage is not None and answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
        stream = client.chat.completions.create(
            model="smollm2:latest", messages=QUESTION, temperature=0, max_tokens=32, stream=True
        )
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert streamed == content
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    import llmos

    with llmos.load_model("smollm2", settings=pulled_settings) as model:  # the same prompt, the same greedy answer
        assert model.chat(QUESTION, temperature=0, max_tokens=32) == content


@pytest.mark.timeout(900)
def test_the_runner_falls_back_to_the_safe_path_where_the_fast_one_dies(
    bundle: Path, edge_python: Path, tmp_path: Path
) -> None:
    """On a CPU whose AMX faults, the bundle's first request must not crash: its own probe sees the fast path die."""
    fault = {"LLMOS_TEST_PROBE_FAULT": "SIGILL"}
    with running_bundle(bundle, edge_python, tmp_path, fault) as (base, log_path):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        answer = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=32)
        assert "Paris" in (answer.choices[0].message.content or "")
    fallback = [line for line in log_path.read_text().splitlines() if "fast CPU path is off" in line]
    assert len(fallback) == 1 and "SIGILL" in fallback[0], log_path.read_text()
    verdicts = list((tmp_path / "cache" / "llmos-edge").glob("llamacpp-*.json"))
    assert len(verdicts) == 1 and json.loads(verdicts[0].read_text())["extra_buffers"] is False
    first = verdicts[0].stat().st_mtime_ns
    with running_bundle(bundle, edge_python, tmp_path, fault):  # the verdict is reused, not probed again
        pass
    assert verdicts[0].stat().st_mtime_ns == first


@pytest.mark.timeout(900)
def test_a_tampered_bundle_neither_runs_nor_imports(bundle: Path, edge_python: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tampered"
    shutil.copytree(bundle, copy)
    flip_byte(copy / "model.gguf", (copy / "model.gguf").stat().st_size // 2)
    port = str(free_port())
    refused = subprocess.run(
        [str(edge_python), str(copy / "run_edge.py"), "--port", port, "--probe-cache", str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=clean_env(),
    )
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to start" in lines[0] and "model.gguf" in lines[0], refused.stderr

    home = tmp_path / "home"
    rejected = run_cli(home, "import", str(copy))
    assert rejected.returncode == 1 and len(rejected.stderr.strip().splitlines()) == 1, rejected.stderr
    assert "nothing was imported" in rejected.stderr and "model.gguf" in rejected.stderr
    assert json.loads(run_cli(home, "list", "--json").stdout) == []
    assert not [p for p in (home / "blobs").rglob("*") if p.is_file()]


def test_import_round_trip_gives_back_the_same_version(bundle: Path, pulled_settings: Settings, tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = run_cli(home, "import", str(bundle))
    assert result.returncode == 0 and "all files matched the manifest" in result.stderr, result.stderr
    shown = json.loads(run_cli(home, "show", "smollm2", "--json").stdout)
    registry = Registry(pulled_settings)
    original = registry.show("smollm2")
    registry.close()
    assert shown["digest"] == original.digest  # same bytes, same template: the very same version
    assert shown["chat_template"] == original.chat_template
    assert shown["lineage"][0]["operation"] == "import"
    assert shown["lineage"][0]["params"]["exported_from"] == "smollm2:latest"

    same_store = run_cli(pulled_settings.home, "import", str(bundle), "--name", "edge-roundtrip")
    assert same_store.returncode == 0 and "the same version as smollm2:latest" in same_store.stderr, same_store.stderr
    bad = run_cli(home, "import", str(bundle), "--chat-template", str(bundle / "README.txt"))
    assert bad.returncode == 1 and "does not apply to an edge bundle" in bad.stderr, bad.stderr


def test_a_requantized_export_comes_back_with_lineage(pulled_settings: Settings, tmp_path: Path) -> None:
    registry = Registry(pulled_settings)
    try:
        source = registry.show("smollm2")
        out = tmp_path / "q4_0"
        manifest = export_bundle(registry, "smollm2", out, quantize="q4_0").manifest
        assert manifest["model"]["quantization"] == "Q4_0" and manifest["export"]["operation"] == "quantize"
        assert not [v for v in registry.list_versions("all") if v.quantization == "Q4_0"]  # export stores nothing
        with pytest.raises(ConflictError, match="not empty"):
            export_bundle(registry, "smollm2", out)
        keep = tmp_path / "keep"
        keep.mkdir()
        (keep / "notes.txt").write_text("mine")
        with pytest.raises(ConflictError, match="holds no edge bundle"):
            export_bundle(registry, "smollm2", keep, force=True)
        assert [p.name for p in keep.iterdir()] == ["notes.txt"]
        shutil.rmtree(keep)
        with pytest.raises(InvalidInputError, match="--target"):
            export_bundle(registry, "smollm2", tmp_path / "x", target="cloud")
        assert not (tmp_path / "x").exists()

        result = import_bundle(registry, out, "edge-q4-roundtrip")
        assert result.parent == "smollm2:latest" and result.view.quantization == "Q4_0"
        assert result.view.lineage[0].operation == "import"
        assert result.view.lineage[0].parent_digest == source.digest

        replaced = export_bundle(registry, "smollm2", out, force=True).manifest  # --force: a plain copy now
        assert replaced["export"]["operation"] == "copy"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["q4_0"]  # no staging or old directories left
    finally:
        registry.close()
