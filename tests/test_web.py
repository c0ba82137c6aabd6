"""The web page at / in a real headless browser (Playwright driving Debian's chromium) against a live
gateway and a tiny CPU worker. Skipped, with the reason, where the browser or playwright is missing."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import TINY_VIDEO
from live_http import LiveService, buffering_proxy, live_service, serve_app, serve_gateway

from service.cli.redis_server import RedisServer
from service.client import Client

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
JOB_TIMEOUT_MS = 120_000
LONG_VIDEO = {"height": 64, "width": 64, "num_frames": 17, "steps": 100}  # canceled long before its end
STEPPED_VIDEO = {"height": 64, "width": 64, "num_frames": 9, "steps": 60}  # seconds, in many progress states
# About two minutes on a CPU, far beyond the page's 8 s stream silence; always canceled.
SILENCE_OUTLASTING_VIDEO = {"height": 256, "width": 256, "num_frames": 65, "steps": 100}


def missing_browser() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if not CHROMIUM.is_file():
        return f"no browser at {CHROMIUM} (apt-get install -y chromium)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = missing_browser()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def live(
    browser: Any, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveService]:
    # Streams read every 0.05 s, so that even a fast machine shows a few live states of a short job.
    with live_service(redis_server, tmp_path_factory.mktemp("web"), events_poll_seconds=0.05) as service:
        yield service


@pytest.fixture
def page(browser: Any, live: LiveService) -> Iterator[Any]:
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(live.url)
    page.wait_for_selector("body[data-ready=true]")  # the forms are built from /openapi.json
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def fill(page: Any, kind: str, values: dict[str, object]) -> None:
    for name, value in values.items():
        page.fill(f"#{kind}-{name}", str(value))


def shown_job_id(page: Any) -> str:
    page.wait_for_function("document.querySelector('#job .id').textContent.length === 32")
    job_id: str = page.inner_text("#job .id")
    return job_id


def wait_status(page: Any, status: str) -> None:
    page.wait_for_function(
        "s => document.querySelector('#job .status').textContent === s", arg=status, timeout=JOB_TIMEOUT_MS
    )


def test_generate_shows_progress_to_100_then_plays_the_video(page: Any, live: LiveService) -> None:
    fields = page.locator("#form-generate")
    height = fields.locator("#generate-height")  # ranges come from the API's schema
    assert (height.get_attribute("min"), height.get_attribute("max"), height.get_attribute("step")) == (
        "16",
        "1280",
        "16",
    )
    assert page.locator("#generate-num_frames").get_attribute("step") == "4"
    assert height.get_attribute("placeholder") == "default 64"  # the served model's, from GET /model
    assert page.locator("#caption-max_tokens").get_attribute("placeholder") == "default 24"
    assert page.locator("#caption-video_reuse").get_attribute("placeholder") == "default 8"
    fill(page, "generate", {"prompt": "a red ball rolls", "seed": 7, **TINY_VIDEO})
    page.evaluate(
        """() => {
        window.seenPercent = [];
        const percent = document.querySelector('#job .percent');
        new MutationObserver(() => window.seenPercent.push(percent.textContent))
            .observe(percent, {childList: true, characterData: true, subtree: true});
    }"""
    )
    requested: list[str] = []
    page.on("request", lambda request: requested.append(urlsplit(request.url).path))
    page.click("#form-generate button[type=submit]")
    job_id = shown_job_id(page)

    page.wait_for_function("document.querySelector('#job progress').value === 100", timeout=JOB_TIMEOUT_MS)
    wait_status(page, "succeeded")
    seen = [int(text.rstrip("%")) for text in page.evaluate("window.seenPercent")]
    assert seen == sorted(seen) and seen[-1] == 100, seen
    # The progress came from the job's event stream, not from polling the job.
    assert requested.count(f"/jobs/{job_id}/events") == 1 and f"/jobs/{job_id}" not in requested
    assert page.inner_text("#job .percent") == "100%"
    assert not page.is_visible("#job .cancel")

    # The video element loads the MP4 (Chromium decodes it) and the download link points at it.
    page.wait_for_function("document.querySelector('#job video').readyState >= 2", timeout=30_000)
    size = page.evaluate(
        "(() => { const v = document.querySelector('#job video'); return [v.videoWidth, v.videoHeight]; })()"
    )
    assert size == [TINY_VIDEO["width"], TINY_VIDEO["height"]]
    link = page.locator("#job a.download")
    assert link.get_attribute("href").endswith(f"jobs/{job_id}/video")
    assert link.get_attribute("download") == f"{job_id}.mp4"
    assert httpx.get(f"{live.url}/jobs/{job_id}/video").headers["content-type"] == "video/mp4"

    # The form sent numbers, not strings, and left the empty options out.
    params = httpx.get(f"{live.url}/jobs/{job_id}").json()["params"]
    assert params == {"prompt": "a red ball rolls", "seed": 7, **TINY_VIDEO}

    # A reload loses nothing: the job stays in the panel (URL hash) and in the recent list.
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    wait_status(page, "succeeded")
    assert page.inner_text("#job .id") == job_id
    recent = page.locator(f"#jobs button[data-id='{job_id}']")
    recent.wait_for()
    assert "generate · succeeded" in recent.inner_text()
    assert "a red ball rolls" in recent.inner_text()


def watch_panel(page: Any) -> None:
    """Record every text the job panel's percentage and ETA show (window.seenStates)."""
    page.evaluate(
        """() => {
        window.seenStates = [];
        const record = () => window.seenStates.push([
            document.querySelector('#job .percent').textContent, document.querySelector('#job .eta').textContent]);
        for (const selector of ['#job .percent', '#job .eta']) {
            new MutationObserver(record).observe(
                document.querySelector(selector), {childList: true, characterData: true, subtree: true});
        }
    }"""
    )


def test_a_long_job_shows_live_progress_with_its_eta(page: Any, live: LiveService) -> None:
    watch_panel(page)
    fill(page, "generate", {"prompt": "a slow red ball", "seed": 3, **STEPPED_VIDEO})
    page.click("#form-generate button[type=submit]")
    shown_job_id(page)
    wait_status(page, "succeeded")
    states = page.evaluate("window.seenStates")
    live_states = [(percent, eta) for percent, eta in states if percent not in ("0%", "100%")]
    assert len({percent for percent, _ in live_states}) >= 2, states
    assert any(re.fullmatch(r"about \d+ (s|min) left", eta) for _, eta in live_states), states
    assert page.inner_text("#job .eta") == ""  # nothing left once it ended


def test_behind_a_buffering_proxy_the_page_polls_instead(browser: Any, live: LiveService) -> None:
    paths: list[str] = []
    with serve_app(buffering_proxy(live.url, paths)) as url, Client(live.url) as client:
        # The page's job waits behind it, its stream silent until the page gives up on it and polls.
        busy = client.generate("keeps the one worker busy", **SILENCE_OUTLASTING_VIDEO)
        context = browser.new_context()
        page = context.new_page()
        try:
            page.goto(url)
            page.wait_for_selector("body[data-ready=true]")
            fill(page, "generate", {"prompt": "through a proxy", **TINY_VIDEO})
            page.click("#form-generate button[type=submit]")
            job_id = shown_job_id(page)  # shown once the page gave up the silent stream and polled
            assert f"/jobs/{job_id}" in paths
            client.cancel(busy.id)
            wait_status(page, "succeeded")
            assert page.inner_text("#job .percent") == "100%"
        finally:
            context.close()
            if not client.get(busy.id).status.terminal:
                client.cancel(busy.id)
    assert paths.count(f"/jobs/{job_id}/events") == 1


def test_queue_position_and_cancel_from_the_page(page: Any, live: LiveService) -> None:
    with Client(live.url) as client:
        busy = client.generate("keeps the one worker busy", **LONG_VIDEO)
        try:
            # A second job waits in the queue: the page says where it stands, and cancels it.
            fill(page, "generate", {"prompt": "waits its turn", **LONG_VIDEO})
            page.click("#form-generate button[type=submit]")
            queued_id = shown_job_id(page)
            wait_status(page, "queued")
            assert re.fullmatch(r"next in the queue|\d+ ahead in the queue", page.inner_text("#job .queue"))
            page.click("#job .cancel")
            wait_status(page, "canceled")
            assert page.inner_text("#job .queue") == ""
            assert not page.is_visible("#job .cancel")
            assert not page.is_visible("#job video")
            assert client.get(queued_id).status == "canceled"

            # The first one (running by now, or still queued), opened from the recent jobs list.
            page.click(f"#jobs button[data-id='{busy.id}']")
            page.wait_for_function("id => location.hash === '#' + id", arg=busy.id)
            page.wait_for_selector("#job .cancel", state="visible")
            page.click("#job .cancel")
            wait_status(page, "canceled")
            assert client.get(busy.id).status == "canceled"
            page.locator(f"#jobs button[data-id='{busy.id}']", has_text="canceled").wait_for()
        finally:
            if not client.get(busy.id).status.terminal:
                client.cancel(busy.id)


def test_validation_errors_from_the_api_are_shown_next_to_the_field(page: Any, live: LiveService) -> None:
    before = httpx.get(f"{live.url}/jobs").json()["jobs"]
    fill(page, "generate", {"prompt": "a ball", "height": 33})
    page.click("#form-generate button[type=submit]")
    error = page.locator("#form-generate .field:has(#generate-height) .error")
    error.wait_for()
    assert re.search(r"multiple of 16 \(got 33\).*\(invalid_parameter\)", error.inner_text())
    assert page.locator("#form-generate .field.invalid").count() == 1
    assert not page.is_visible("#form-generate .form-error")
    assert httpx.get(f"{live.url}/jobs").json()["jobs"] == before  # nothing was submitted

    fill(page, "generate", {"height": 32, "num_frames": 6})  # the next answer replaces the message
    page.click("#form-generate button[type=submit]")
    frames_error = page.locator("#form-generate .field:has(#generate-num_frames) .error")
    frames_error.wait_for()
    assert "4k+1" in frames_error.inner_text()
    assert not error.is_visible()

    page.click("[role=tab][data-tab=caption]")  # no file: the API's message lands at the drop zone
    assert page.is_visible("#form-caption") and not page.is_visible("#form-generate")
    page.click("#form-caption button[type=submit]")
    page.locator("#drop .error").wait_for()
    assert "file: field required" in page.inner_text("#drop .error")


def test_caption_a_dropped_video(page: Any, live: LiveService, tmp_path: Path) -> None:
    with Client(live.url) as client:  # a video to drop, made by the service itself
        made = client.wait(client.generate("a cat", seed=5, **TINY_VIDEO).id, timeout=120)
    page.click("[role=tab][data-tab=caption]")
    page.evaluate(
        """async (url) => {
        const blob = await (await fetch(url)).blob();
        const files = new DataTransfer();
        files.items.add(new File([blob], 'clip.mp4', {type: 'video/mp4'}));
        const drop = new DragEvent('drop', {dataTransfer: files, bubbles: true, cancelable: true});
        document.querySelector('#drop').dispatchEvent(drop);
    }""",
        f"jobs/{made.id}/video",
    )
    assert page.inner_text("#drop .file-name") == "clip.mp4"
    # Seeded, video and caption alike: unseeded, the random tiny model now and then samples </s> first
    # and the caption is empty (CI saw it), which would leave nothing to compare below.
    fill(page, "caption", {"steps": 2, "max_tokens": 8, "seed": 5})
    page.click("#form-caption button[type=submit]")
    job_id = shown_job_id(page)
    wait_status(page, "succeeded")

    caption = httpx.get(f"{live.url}/jobs/{job_id}").json()["result"]["caption"]
    assert caption and page.inner_text("#job .caption") == caption
    assert not page.is_visible("#job video")  # caption jobs have no video
    link = page.locator("#job a.download")
    assert link.get_attribute("href").endswith(f"jobs/{job_id}/result")
    assert link.get_attribute("download") == f"{job_id}.json"


def test_with_api_keys_the_page_sends_the_key_and_still_plays_the_video(
    browser: Any, live: LiveService
) -> None:
    settings = live.settings.model_copy(update={"api_keys": ["s3cret"]})  # same queue: the same worker
    with serve_gateway(settings) as url:
        context = browser.new_context()
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        try:
            page.goto(url)
            page.wait_for_selector("body[data-ready=true]")
            page.locator("#jobs .error", has_text="unauthorized").wait_for()  # the list says why it is empty

            page.click("#settings summary")
            page.fill("#api-key", "s3cret")
            page.dispatch_event("#api-key", "change")
            page.locator("#jobs .error").wait_for(state="detached")
            fill(page, "generate", {"prompt": "a key", **TINY_VIDEO})
            page.click("#form-generate button[type=submit]")
            shown_job_id(page)
            wait_status(page, "succeeded")
            # <video src> cannot send a header: the page fetches the MP4 with the key into a blob.
            page.wait_for_function("document.querySelector('#job video').readyState >= 2", timeout=30_000)
            assert page.locator("#job a.download").get_attribute("href").startswith("blob:")
            assert errors == []
        finally:
            context.close()


def test_the_page_the_schema_and_get_model_show_the_limits_the_pipeline_enforces(
    page: Any, live: LiveService
) -> None:
    """GET /model, /openapi.json and the page's fields show, for every mode and option, the bounds the
    served pipeline (the tiny preset within the worker's settings) enforces, and the pipeline refuses the
    next value beyond each."""
    import numpy as np

    from model.errors import InvalidParameterError, PromptTooLongError
    from model.pipeline import UniViGUPipeline
    from worker.loading import cap_limits

    pipe = UniViGUPipeline.from_preset("tiny")
    cap_limits(pipe, live.settings)
    model = httpx.get(f"{live.url}/model").json()
    schema = httpx.get(f"{live.url}/openapi.json").json()
    caption_form = schema["paths"]["/caption"]["post"]["requestBody"]["content"]["multipart/form-data"]
    properties = {
        "generate": schema["components"]["schemas"]["GenerateRequest"]["properties"],
        "joint": schema["components"]["schemas"]["JointRequest"]["properties"],
        "caption": caption_form["schema"]["properties"],
    }
    runs = {
        "generate": lambda **options: pipe.generate(options.pop("prompt", "a red ball"), **options),
        "joint": lambda **options: pipe.joint(options.pop("prompt", "a red ball"), **options),
        "caption": lambda **options: pipe.caption(np.zeros((5, 32, 32, 3), np.uint8), **options),
    }
    for mode, enforced in pipe.limits.items():
        assert model["limits"][mode] == enforced.to_json(), mode
        for name, rule in enforced.rules.items():
            shown = next(branch for branch in properties[mode][name]["anyOf"] if branch["type"] != "null")
            assert (shown["minimum"], shown["maximum"]) == (rule.minimum, rule.maximum), (mode, name)
            field = page.locator(f"#{mode}-{name}")
            bounds = float(field.get_attribute("min")), float(field.get_attribute("max"))
            assert bounds == (float(rule.minimum), float(rule.maximum)), (mode, name)
            beyond = rule.maximum + (rule.multiple_of or (4 if rule.four_k_plus_one else 1))
            with pytest.raises(InvalidParameterError) as refused:
                runs[mode](**{name: beyond})
            assert refused.value.param == name
        for name, text in enforced.texts.items():
            assert text.max_tokens is not None
            shown = properties[mode][name]
            shown = next((b for b in shown.get("anyOf", []) if b["type"] != "null"), shown)
            assert shown["x-max-tokens"] == text.max_tokens and shown["maxLength"] == text.max_chars
            hint = page.locator(f".field:has(#{mode}-{name}) .hint").inner_text()
            assert f"up to {text.max_tokens} tokens" in hint, (mode, name)
            with pytest.raises(PromptTooLongError) as refused:
                runs[mode](**{name: " ".join(["red"] * text.max_tokens)})  # one word more, with the end token
            assert refused.value.param == name
