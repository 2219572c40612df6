"""The edge runner (``run_edge.py`` in a bundle): manifest checks, request validation, text streaming, prompt
rendering, and its HTTP server driven by the official ``openai`` client over a fake engine (no model loaded)."""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llmos.edge import runner as er
from llmos.formats.chat_template import CHATML_TEMPLATE, GEMMA_TEMPLATE, render_chat
from llmos.types import ChatMessage

# --- bundles --------------------------------------------------------------------------------------------------------


def make_bundle(root: Path, **manifest: Any) -> Path:
    """A bundle with small stand-in files and a manifest that lists them correctly (``manifest`` overrides keys)."""
    files = {
        "model.gguf": b"GGUF" + bytes(range(256)) * 4,
        "chat_template.json": json.dumps({"template": CHATML_TEMPLATE, "bos_token": "", "eos_token": ""}).encode(),
        "run_edge.py": b"print('hi')\n",
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    body = {
        "format": er.BUNDLE_FORMAT,
        "name": "tiny:latest",
        "model": {"file": "model.gguf", "chat_template": "chat_template.json", "context_length": 512},
        "files": [
            {"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in files.items()
        ],
        **manifest,
    }
    (root / er.MANIFEST_NAME).write_text(json.dumps(body))
    return root


def test_an_intact_bundle_verifies_and_is_recognised(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    manifest = er.verify_bundle(root)
    assert manifest["name"] == "tiny:latest" and len(manifest["files"]) == 3
    assert er.is_bundle(root)
    assert not er.is_bundle(root / "model.gguf") and not er.is_bundle(tmp_path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: (r / "model.gguf").write_bytes(b"GGUF" + bytes(range(256))[::-1] * 4), "model.gguf does not match"),
        (lambda r: (r / "run_edge.py").write_bytes(b"print('pwned')\n"), "run_edge.py has"),
        (lambda r: (r / "chat_template.json").unlink(), "chat_template.json is missing"),
    ],
)
def test_a_changed_or_missing_file_is_named(tmp_path: Path, damage: Any, message: str) -> None:
    root = make_bundle(tmp_path / "b")
    damage(root)
    with pytest.raises(er.BundleError, match=message):
        er.verify_bundle(root)


def test_one_flipped_byte_is_caught_even_at_the_same_size(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    data = bytearray((root / "model.gguf").read_bytes())
    data[100] ^= 1
    (root / "model.gguf").write_bytes(bytes(data))
    assert er.bundle_problems(root, er.load_manifest(root), hashes=False) == []  # sizes alone cannot see it
    with pytest.raises(er.BundleError, match=r"model\.gguf does not match its sha256"):
        er.verify_bundle(root)


@pytest.mark.parametrize("path", ["../outside", "/etc/passwd", "a/../b", "", ".hidden", "a\\b", "manifest.json"])
def test_manifest_paths_must_stay_inside_the_bundle(tmp_path: Path, path: str) -> None:
    root = make_bundle(tmp_path / "b")
    manifest = json.loads((root / er.MANIFEST_NAME).read_text())
    manifest["files"].append({"path": path, "size": 0, "sha256": "0" * 64})
    (root / er.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(er.BundleError):
        er.verify_bundle(root)


@pytest.mark.parametrize(
    "change",
    [
        {"format": "something.else"},
        {"files": []},
        {"model": {"file": "absent.gguf", "chat_template": "chat_template.json"}},
        {"name": ""},
    ],
)
def test_a_malformed_manifest_is_refused(tmp_path: Path, change: dict[str, Any]) -> None:
    root = make_bundle(tmp_path / "b", **change)
    with pytest.raises(er.BundleError):
        er.verify_bundle(root)


def test_a_symlinked_file_is_refused(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    outside = tmp_path / "elsewhere.py"
    outside.write_bytes((root / "run_edge.py").read_bytes())
    (root / "run_edge.py").unlink()
    (root / "run_edge.py").symlink_to(outside)
    with pytest.raises(er.BundleError, match=r"run_edge\.py is missing"):
        er.verify_bundle(root)


# --- command line ---------------------------------------------------------------------------------------------------


def test_arguments_default_to_loopback_and_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    args = er.parse_args([])
    assert (args.host, args.port, args.ctx, args.no_verify) == ("127.0.0.1", er.DEFAULT_PORT, er.DEFAULT_CTX, False)
    for bad in (["--port", "0"], ["--threads", "0"], ["--ctx", "4"]):
        with pytest.raises(SystemExit) as exit_info:
            er.parse_args(bad)
        assert exit_info.value.code == 2
    assert er.context_size(4096, {"model": {"context_length": 512}}) == 512
    assert er.context_size(256, {"model": {"context_length": None}}) == 256


def test_main_verifies_before_anything_else(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_bundle(tmp_path / "b")
    assert er.main(["--bundle", str(root), "--verify-only"]) == 0
    assert "all 3 files of tiny:latest match" in capsys.readouterr().out
    assert er.main(["--bundle", str(root), "--host", "0.0.0.0"]) == 1  # noqa: S104 - refused: no key
    assert "without --api-key" in capsys.readouterr().err
    (root / "model.gguf").write_bytes(b"GGUF" + bytes(1024))
    assert er.main(["--bundle", str(root)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "refusing to start" in lines[0] and "model.gguf" in lines[0]


# --- prompts and requests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, GEMMA_TEMPLATE])
def test_prompts_are_rendered_exactly_as_llmos_renders_them(template: str) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    ours = er.ChatTemplate(template, bos_token="<bos>", eos_token="<eos>").render(messages)
    theirs = render_chat(
        [ChatMessage(m["role"], m["content"]) for m in messages], template, bos_token="<bos>", eos_token="<eos>"
    )  # type: ignore[arg-type]
    assert ours == theirs


def test_a_template_that_raises_is_a_400() -> None:
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}x"
    with pytest.raises(er.RequestError, match="first must be user") as info:
        er.ChatTemplate(strict).render([{"role": "system", "content": "s"}])
    assert info.value.status == 400 and info.value.param == "messages"


def test_requests_follow_openai_defaults_and_llmos_roles() -> None:
    request = er.parse_chat_request(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ],
            "stop": "\n",
        }
    )
    assert request.messages == [{"role": "system", "content": "ab"}]
    assert (request.temperature, request.top_p, request.top_k, request.max_tokens) == (1.0, 1.0, 0, None)
    assert request.stop == ("\n",)
    assert (
        er.parse_chat_request({"model": "m", "messages": [{"role": "user"}], "max_completion_tokens": 3}).max_tokens
        == 3
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "0"}, "temperature"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, "stop"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
def test_bad_requests_are_400_naming_the_field(body: Any, param: str | None) -> None:
    with pytest.raises(er.RequestError) as info:
        er.parse_chat_request(body)
    assert info.value.status == 400 and info.value.param == param


def test_text_stream_holds_back_a_possible_stop_string_and_split_utf8() -> None:
    text = er.TextStream(("</s>",))
    assert text.push(b"Hello <") == "Hello "
    assert text.push(b"/") == ""
    assert text.push(b"x") == "</x"  # not a stop string after all
    assert text.push("é".encode()[:1]) == ""  # half a character waits
    assert text.push("é".encode()[1:] + b" bye</s> never") == "é bye"
    assert text.stopped and text.push(b"more") == "" and text.finish() == ""
    plain = er.TextStream()
    assert plain.push(b"ab") == "ab" and plain.finish() == ""


# --- the HTTP server over a fake engine -----------------------------------------------------------------------------

PIECES = [b"The", b" capital", b" is", b" Paris", b".", b"\xe2\x82", b"\xac", b" END", b" more"]
EOG = 99


class FakeEngine:
    """Tokens are indices into PIECES; the answer is scripted; an end-of-generation token follows it."""

    n_ctx = 64

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.seen: list[er.ChatRequest] = []

    def tokenize(self, text: str) -> list[int]:
        return [0] * max(1, len(text.split()))

    def generate(self, tokens: list[int], request: er.ChatRequest) -> Iterator[int]:
        self.seen.append(request)
        yield from self.script
        yield EOG

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def token_bytes(self, token: int, previous: list[int]) -> bytes:
        return PIECES[token]


@pytest.fixture
def served() -> Iterator[tuple[str, FakeEngine]]:
    engine = FakeEngine([0, 1, 2, 3, 4, 5, 6])
    app = er.EdgeApp("tiny:latest", er.ChatTemplate(CHATML_TEMPLATE), engine, api_key=None)
    server = er.EdgeServer(("127.0.0.1", 0), app, quiet=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", engine
    finally:
        server.shutdown()
        server.server_close()


def test_the_official_client_chats_and_streams(served: tuple[str, FakeEngine]) -> None:
    base, engine = served
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Capital of France?"}], temperature=0
    )
    assert answer.choices[0].message.content == "The capital is Paris.€"
    assert answer.choices[0].finish_reason == "stop" and answer.model == "tiny:latest"
    assert answer.usage is not None and answer.usage.completion_tokens == 7 and answer.usage.prompt_tokens > 0
    assert engine.seen[-1].temperature == 0.0
    chunks = list(
        client.chat.completions.create(
            model="tiny:latest",
            messages=[{"role": "user", "content": "Capital of France?"}],
            stream=True,
            stream_options={"include_usage": True},
            stop=[" is"],
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert [m.id for m in client.models.list()] == ["tiny:latest"]
    assert client.models.retrieve("tiny:latest").id == "tiny:latest"


def test_max_tokens_ends_with_length(served: tuple[str, FakeEngine]) -> None:
    base, _ = served
    body = {"model": "tiny", "messages": [{"role": "user", "content": "q"}], "max_tokens": 2}
    answer = httpx.post(f"{base}/v1/chat/completions", json=body).json()
    assert answer["choices"][0]["message"]["content"] == "The capital"
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 2


def test_errors_have_the_openai_shape(served: tuple[str, FakeEngine]) -> None:
    base, _ = served
    chat = f"{base}/v1/chat/completions"
    cases = [
        (httpx.post(chat, json={"model": "other", "messages": [{"role": "user", "content": "q"}]}), 404, "model"),
        (httpx.post(chat, content=b"{not json", headers={"Content-Type": "application/json"}), 400, None),
        (httpx.post(chat, json={"model": "tiny", "messages": "hi"}), 400, "messages"),
        (httpx.get(f"{base}/v1/nothing"), 404, None),
        (httpx.get(chat), 405, None),
        (httpx.get(f"{base}/v1/models/other"), 404, "model"),
        (
            httpx.post(chat, json={"model": "tiny", "messages": [{"role": "user", "content": "a " * 70}]}),
            400,
            "messages",
        ),
        (
            httpx.post(chat, json={"model": "tiny", "messages": [{"role": "user", "content": "q"}], "max_tokens": 64}),
            400,
            "max_tokens",
        ),
    ]
    for response, status, param in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert httpx.get(f"{base}/health").json() == {"status": "ok", "model": "tiny:latest"}
    connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=10)
    connection.request(
        "POST", "/v1/chat/completions", body=b"x", headers={"Content-Length": str(er.MAX_BODY_BYTES + 1)}
    )
    assert connection.getresponse().status == 413  # refused from the header, before any of the body is read
    connection.close()


def test_an_api_key_guards_the_v1_routes() -> None:
    app = er.EdgeApp("tiny:latest", er.ChatTemplate(CHATML_TEMPLATE), FakeEngine([0]), api_key="s3cret")
    server = er.EdgeServer(("127.0.0.1", 0), app, quiet=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{base}/health").status_code == 200
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("name", "accepted", "refused"),
    [
        ("tiny:latest", {"tiny", "tiny:latest"}, {"tiny:v2", "other"}),
        ("tiny", {"tiny", "tiny:latest"}, {"tiny:v2"}),
        ("team/tiny:v2", {"team/tiny:v2"}, {"team/tiny", "tiny:v2", "team/tiny:latest"}),
    ],
)
def test_the_served_model_answers_to_its_names(name: str, accepted: set[str], refused: set[str]) -> None:
    app = er.EdgeApp(name, er.ChatTemplate(CHATML_TEMPLATE), FakeEngine([0]))
    for alias in accepted:
        app.check_model(alias)
    for alias in refused:
        with pytest.raises(er.RequestError):
            app.check_model(alias)
