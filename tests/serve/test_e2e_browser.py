"""The demo in a real browser: ``serve/app.py`` in a subprocess on a free loopback port, driven by headless Chromium.

Debian's ``/usr/bin/chromium`` through Playwright's Python API (specs/environment.md §8: never ``playwright install``;
``scripts/test.sh`` installs the package when it is missing). Checks: the LaVin-DiT tab lists only the run's trained
tasks and starts on the official lavin-20 grid; a built-in task shows an upscaled query | prediction | answer image;
uploaded images are previewed in the gallery; a non-image, a zero-byte file and a 20000x20000 PNG header each give
their message and the server still answers the next request; Gradio's file route serves neither the checkpoint nor
/etc/passwd. Screenshots are written to ``test-artifacts/serve_e2e*.png``.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from upload_files import huge_png

from genvis.models import LaVinDiTTransformer3DModel, PixelUnshuffleAutoencoder
from genvis.pipelines import LaVinDiTPipeline

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
ARTIFACTS = ROOT / "test-artifacts"
TRAINED_TASKS = ["colorization", "edge_detection", "inpainting"]

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app serving a tiny random-init LaVin-DiT run folder; yields (url, process, pipeline folder)."""
    work = tmp_path_factory.mktemp("serve_e2e")
    torch.manual_seed(0)
    vae = PixelUnshuffleAutoencoder()
    transformer = LaVinDiTTransformer3DModel.from_preset("tiny", in_channels=vae.config.latent_channels)
    pipeline_dir = work / "run" / "pipeline"
    LaVinDiTPipeline(transformer, vae, FlowMatchEulerDiscreteScheduler()).save_pretrained(pipeline_dir)
    run_config = {  # what train/lavin_dit.py writes next to its final export; guidance 1 halves the sampling cost
        "output_dir": str(work / "run"),
        "data": {"tasks": TRAINED_TASKS, "kinds": ["image"], "size": 32},
        "sampling": {"time_grid": "lavin-20", "num_inference_steps": None, "guidance_scale": 1.0},
    }
    (work / "run" / "config.json").write_text(json.dumps(run_config))
    port = free_port()
    log = open(work / "server.log", "w")  # noqa: SIM115 - closed after the process ends
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "serve" / "app.py"), "--checkpoint", str(work / "run"), "--port", str(port)]
    command += ["--steps", "2", "--cache-dir", str(work / "cache")]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 150
    while True:
        if process.poll() is not None:
            raise AssertionError(
                f"serve/app.py exited with {process.returncode}:\n{(work / 'server.log').read_text()}"
            )
        try:
            if http_status(url) == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"serve/app.py did not answer in time:\n{(work / 'server.log').read_text()}")
        time.sleep(0.5)
    yield url, process, pipeline_dir, work
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log.close()


def make_uploads(folder: Path) -> dict[str, Path]:
    folder.mkdir(exist_ok=True)
    files = {}
    for name, color in (("input", (20, 20, 20)), ("target", (220, 40, 40)), ("query", (90, 90, 90))):
        files[name] = folder / f"{name}.png"
        PIL.Image.new("RGB", (48, 40), color).save(files[name])
    files["text"] = folder / "notes.png"
    files["text"].write_text("these are notes, not pixels")
    files["empty"] = folder / "empty.png"
    files["empty"].write_bytes(b"")
    files["huge"] = huge_png(folder / "huge.png", 20000, 20000)
    return files


def test_browser_session(server, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` (scripts/test.sh does)")
    from playwright.sync_api import expect, sync_playwright

    url, process, pipeline_dir, work = server
    uploads = make_uploads(tmp_path / "uploads")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            expect(page.locator("#lavin-status")).to_contain_text("LaVin-DiT: loaded", timeout=30_000)
            page.get_by_role("tab", name="MVDiT text-to-video").click()
            expect(page.locator("#mvdit-status")).to_contain_text("accelerate launch train/mvdit.py")
            page.get_by_role("tab", name="LaVin-DiT in-context").click()
            defaults = page.locator("#lavin-defaults")
            expect(defaults).to_contain_text("Tasks this checkpoint was trained on")
            expect(defaults).to_contain_text("Resolution 32 px")
            expect(page.locator("#lavin-time-grid input")).to_have_value("lavin-20 (official default, 19 steps)")
            expect(page.locator("#lavin-steps")).to_be_hidden()
            page.locator("#lavin-task input").click()
            options = page.get_by_role("option")
            expect(options).to_have_count(len(TRAINED_TASKS))
            assert [
                text.split()[-1] for text in options.all_inner_texts()
            ] == TRAINED_TASKS  # "✓" marks the chosen one
            page.locator("#lavin-task input").press("Escape")

            # 1. a built-in task shows query | prediction | exact answer, upscaled, and the upscaled gallery
            page.click("#lavin-run-builtin")
            info = page.locator("#lavin-info")
            expect(info).to_contain_text("colorization: 2 context pair(s)", timeout=90_000)
            expect(info).to_contain_text("lavin-20 grid, 19 steps, no guidance")
            output = page.locator("#lavin-output img")
            expect(output).to_be_visible()
            first_src = output.get_attribute("src")
            assert first_src
            assert output.evaluate("image => image.naturalHeight") >= 256
            expect(page.locator("#lavin-gallery")).to_contain_text("exact answer")
            page.screenshot(path=str(ARTIFACTS / "serve_e2e_builtin.png"), full_page=True)

            # 2. bad uploads: each gives its message, and the server stays up
            page.get_by_role("tab", name="Upload your own").click()
            page.locator("#lavin-context input[type=file]").set_input_files([uploads["input"], uploads["target"]])
            expect(info).to_contain_text("preview: 1 context pair(s), no query yet", timeout=30_000)
            expect(page.locator("#lavin-gallery")).to_contain_text("target 1")
            query_input = page.locator("#lavin-query input[type=file]")
            for key, message in (
                ("text", "'notes.png' is not an image in an accepted format"),
                ("empty", "'empty.png' is empty (0 bytes)"),
                ("huge", "'huge.png' is 400.0 MP; the limit is"),
            ):
                query_input.set_input_files(uploads[key])
                expect(page.locator("#lavin-query")).to_contain_text(uploads[key].name, timeout=30_000)
                page.click("#lavin-run-upload")
                toast = page.locator(".toast-body").filter(has_text=message)
                expect(toast).to_be_visible(timeout=30_000)
                expect(toast).to_contain_text("query image:")
                toast.locator(".toast-close").click()
                assert process.poll() is None, "the server died on a bad upload"
                page.locator("#lavin-query button[aria-label='Clear']").first.click()

            # 3. the next request still works: a good upload, then another built-in task
            query_input.set_input_files(uploads["query"])
            expect(page.locator("#lavin-query")).to_contain_text("query.png")
            expect(info).to_contain_text("preview: 1 context pair(s), a query", timeout=30_000)
            page.click("#lavin-run-upload")
            expect(info).to_contain_text("uploaded task: 1 context pair(s)", timeout=60_000)
            expect(output).to_be_visible()
            assert output.get_attribute("src") != first_src
            gallery = page.locator("#lavin-gallery")
            for caption in ("input 1", "target 1", "query", "prediction"):
                expect(gallery).to_contain_text(caption)
            page.screenshot(path=str(ARTIFACTS / "serve_e2e_upload.png"), full_page=True)
            page.get_by_role("tab", name="Built-in task").click()
            page.locator("#lavin-task input").fill("edge_detection")
            page.locator("#lavin-task input").press("Enter")
            page.click("#lavin-run-builtin")
            expect(page.locator("#lavin-info")).to_contain_text("edge_detection:", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "serve_e2e.png"), full_page=True)
        finally:
            browser.close()

    # 4. Gradio's file route serves neither the checkpoint nor files outside its cache
    weights = next((pipeline_dir / "transformer").glob("*.safetensors"))
    for target in (weights, Path("/etc/passwd")):
        assert http_status(f"{url}gradio_api/file={target}") in (403, 404), target
    assert http_status(url) == 200 and process.poll() is None
    assert "request refused: query image: 'empty.png' is empty" in (work / "server.log").read_text()
