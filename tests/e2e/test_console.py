"""The web console in a real browser: Debian's chromium driven by Playwright against a real `llmos serve`.

Each test drives the console the way a person would (keyboard included) and saves screenshots of every page at a
desktop (1280x800) and a phone (390x844) viewport under ``artifacts/console/`` (kept by CI). Any error the browser
logs fails the test.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from llmos.config import Settings
from llmos.registry import sources
from llmos.registry.service import Registry
from tests.helpers import ServerProcess, run_cli, toy_qa_rows

CHROMIUM = os.environ.get("LLMOS_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("LLMOS_ARTIFACTS", Path(__file__).resolve().parents[2] / "artifacts")) / "console"
VIEWPORTS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() and not os.environ.get("CI"),
    reason="chromium is not installed; `make test-tools` installs Debian's package",
)


class Console:
    def __init__(self, home: Path, server: ServerProcess, key: str) -> None:
        self.home = home
        self.server = server
        self.key = key
        self.url = f"{server.base}/console/"


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    home = tmp_path_factory.mktemp("console") / "home"
    registry = Registry(Settings(home=home))
    sources.pull(registry, "smollm2")
    registry.close()
    data = home.parent / "qa.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in toy_qa_rows(16)))
    assert run_cli(home, "data", "import", str(data), "--name", "qa").returncode == 0
    assert run_cli(home, "tenants", "create", "acme").returncode == 0
    result = run_cli(home, "keys", "create", "--tenant", "acme", "--role", "admin")
    assert result.returncode == 0, result.stderr
    server = ServerProcess(home)
    yield Console(home, server, result.stdout.strip())
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: run `make test-tools` (apt-get install chromium)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Page:
    """A browser tab at one viewport that records every error the browser logs."""

    def __init__(self, browser: Any, console: Console, viewport: str) -> None:
        self.viewport = viewport
        self.context = browser.new_context(viewport=VIEWPORTS[viewport])
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda exc: self.errors.append(f"page: {exc}"))
        self.console = console

    def login(self) -> None:
        page = self.page
        page.goto(self.console.url)
        page.get_by_label("API key").wait_for()
        self.shot("login")
        page.keyboard.type(self.console.key)  # the key field has focus: a keyboard-only login
        page.keyboard.press("Enter")
        page.get_by_role("heading", name="Models").wait_for()

    def go(self, route: str, heading: str) -> None:
        self.page.goto(f"{self.console.url}#{route}")
        self.page.get_by_role("heading", name=heading, exact=True).first.wait_for()

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.evaluate("window.scrollTo(0, 0)")  # a full-page shot of a scrolled page repeats the sticky bar
        self.page.screenshot(path=str(SHOTS / f"{name}-{self.viewport}.png"), full_page=True)
        width = self.page.evaluate("document.documentElement.scrollWidth")
        assert width <= VIEWPORTS[self.viewport]["width"], f"{name} scrolls sideways at {self.viewport}: {width}px"

    def close(self) -> None:
        self.context.close()
        assert self.errors == [], self.errors


@pytest.fixture(params=list(VIEWPORTS))
def tab(request: pytest.FixtureRequest, browser: Any, console: Console) -> Iterator[Page]:
    page = Page(browser, console, request.param)
    yield page
    page.close()


def test_the_console_is_served_without_node_and_needs_a_key_for_data(console: Console) -> None:
    import httpx

    index = httpx.get(console.url)
    assert index.status_code == 200 and "text/html" in index.headers["content-type"]
    assert "script-src 'self'" in index.headers["content-security-policy"]
    script = re.search(r'src="(/console/assets/[^"]+\.js)"', index.text)
    assert script, index.text
    asset = httpx.get(f"{console.server.base}{script.group(1)}")
    assert asset.status_code == 200 and "immutable" in asset.headers["cache-control"]
    assert httpx.get(f"{console.server.base}/console/info.json").json()["auth_required"] is True
    assert httpx.get(f"{console.server.base}/admin/models").status_code == 401
    assert httpx.get(f"{console.server.base}/console/../admin/models").status_code in (401, 404)
    assert httpx.get(f"{console.server.base}/console/assets/missing.js").status_code == 404


def test_login_playground_streams_paris_and_runtime_shows_the_model(tab: Page, console: Console) -> None:
    page = tab.page
    tab.login()
    page.get_by_role("link", name="smollm2:latest").wait_for()
    tab.shot("models")

    if tab.viewport == "desktop":
        # keyboard only: focus sits on the page heading; Shift+Tab walks back through the navigation to the skip link
        seen = []
        for _ in range(15):
            page.keyboard.press("Shift+Tab")
            seen.append(page.evaluate("document.activeElement.textContent").strip())
            if seen[-1] == "Skip to content":
                break
        assert "Runtime" in seen and seen[-1] == "Skip to content", seen
        for _ in range(len(seen) - 1 - seen.index("Runtime")):  # and Tab forward from the skip link to it
            page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent").strip() == "Runtime"
        page.keyboard.press("Enter")
    else:
        menu = page.get_by_role("button", name="Menu")
        menu.click()
        assert menu.get_attribute("aria-expanded") == "true"
        page.get_by_role("link", name="Runtime").click()
    page.get_by_role("heading", name="Runtime").wait_for()
    resident = page.get_by_test_id("resident-models")
    if tab.viewport == "desktop":  # the first test to run: nothing has loaded the model yet
        page.get_by_text("No model is loaded").wait_for()
        tab.shot("runtime-empty")

    page.goto(f"{console.url}#/chat/smollm2:latest")
    page.get_by_role("heading", name="Playground").wait_for()
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("24")
    page.get_by_label("Message").fill("What is the capital of France?")
    page.get_by_label("Message").press("Enter")
    stats = page.get_by_test_id("stream-stats")
    stats.wait_for(timeout=120_000)
    answer = page.locator(".message.assistant .content").last.inner_text()
    assert "Paris" in answer, answer
    assert re.search(r"\d+ tokens · [\d.]+ tok/s", stats.inner_text()), stats.inner_text()
    tab.shot("playground")

    page.goto(f"{console.url}#/runtime")
    resident.get_by_role("link", name="smollm2:latest").wait_for()
    assert "llama.cpp" in resident.inner_text() or "llamacpp" in resident.inner_text()
    tab.shot("runtime")


def test_model_details_datasets_usage_and_keys_pages(tab: Page, console: Console) -> None:
    page = tab.page
    tab.login()
    page.get_by_role("link", name="smollm2:latest").click()
    page.get_by_role("heading", name="smollm2:latest").wait_for()
    page.get_by_role("heading", name="Lineage").wait_for()
    assert page.get_by_text("SmolLM2-135M-Instruct.Q4_1.gguf").first.is_visible() or page.locator(".files").count()
    tab.shot("model")

    tab.go("/datasets", "Datasets")
    page.get_by_role("link", name=re.compile(r"^qa:latest")).first.click()
    page.get_by_role("heading", name="Preview").wait_for()
    page.locator("table.preview tbody tr").first.wait_for()
    tab.shot("datasets")

    openai.OpenAI(base_url=f"{console.server.base}/v1", api_key=console.key, max_retries=0).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    tab.go("/usage", "Usage")
    page.get_by_role("heading", name="Tokens by tenant").wait_for()
    tab.shot("usage")

    tab.go("/access", "Keys & tenants")
    page.get_by_role("cell", name="acme").first.wait_for()
    tab.shot("access")


def test_a_training_job_started_in_the_console_shows_progress_and_a_growing_loss_curve(
    browser: Any, console: Console
) -> None:
    tab = Page(browser, console, "desktop")
    page = tab.page
    tab.login()
    tab.go("/jobs", "Jobs")
    page.get_by_role("button", name="New job").click()
    page.get_by_label("Fine-tune (LoRA)").check()
    page.get_by_label("Base model").select_option("smollm2:latest")
    page.get_by_label("Dataset").select_option("qa:latest")
    page.get_by_label("New model name").fill("console-tuned")
    page.get_by_label("Steps").fill("8")
    page.get_by_role("button", name="Start job").click()
    page.get_by_role("heading", name=re.compile(r"^Job j")).wait_for()

    chart = page.get_by_test_id("loss-chart")
    chart.wait_for(timeout=240_000)
    page.wait_for_function(
        "() => Number(document.querySelector('[data-testid=loss-chart]')?.dataset.points || 0) >= 1",
        timeout=240_000,
    )
    first = int(chart.get_attribute("data-points") or 0)
    progress_before = page.get_by_test_id("job-progress").inner_text()
    tab.shot("job-running")
    page.wait_for_function(
        f"() => Number(document.querySelector('[data-testid=loss-chart]').dataset.points) > {first}",
        timeout=240_000,
    )
    page.locator(".badge", has_text="succeeded").first.wait_for(timeout=240_000)
    assert page.get_by_test_id("job-progress").inner_text() == "8 / 8"
    assert progress_before != "8 / 8" or first < 8
    page.wait_for_function(  # the curve's last points arrive with the next poll after the job finished
        "() => Number(document.querySelector('[data-testid=loss-chart]').dataset.points) >= 8", timeout=30_000
    )
    assert int(chart.get_attribute("data-points") or 0) == 8
    assert page.locator(".chart polyline").count() >= 1
    tab.shot("job")
    page.get_by_role("link", name="console-tuned:latest").click()  # the result links to the new model's page
    page.get_by_role("heading", name="console-tuned:latest").wait_for()
    graph = page.get_by_role("img", name="Lineage graph")
    graph.wait_for()
    drawn = graph.text_content() or ""
    assert "smollm2:latest" in drawn and "fine-tune" in drawn, drawn
    tab.shot("model-lineage")
    tab.go("/jobs", "Jobs")
    tab.shot("jobs")
    tab.close()
