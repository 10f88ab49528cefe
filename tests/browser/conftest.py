"""Browser-test fixtures: the real server (FastAPI + Gradio + uvicorn) in a thread, headless Debian Chromium.

One server per session with a tiny untrained "demo" checkpoint; pages wait for the app's readiness marker
(``body[data-app-ready]``) because ``networkidle`` never fires in a Gradio app.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
SHOTS = Path("/tmp/studio-shots")
DEMO_NAME = "demo-untrained.safetensors"
CONTROLNET_NAME = "control_tiny_canny.safetensors"
ACTION_TIMEOUT = 90_000  # clicks, fills, locator waits (Playwright's default 30 s is short on a busy 2-core machine)


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    reason = None
    if not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} is missing (apt-get install chromium chromium-driver; launch.py --test does it)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "playwright (python) is not installed (pip install -r requirements-test.txt)"
    if reason:  # HTTP-only tests in this folder still run
        for item in items:
            if here in Path(str(item.fspath)).parents and {"browser", "page"} & set(item.fixturenames):
                item.add_marker(pytest.mark.skip(reason=reason))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_args(**kw) -> argparse.Namespace:
    base = dict(listen=False, port=None, nowebui=False, api=False, gradio_auth=None, api_auth=None)
    return argparse.Namespace(**{**base, **kw})


class RunningServer:
    """uvicorn in a daemon thread; ``url`` once it accepts connections."""

    def __init__(self, app, port: int | None = None):
        import uvicorn
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def make_settings(root: Path, models: Path, **kw):
    from studio.settings import Settings
    kw.setdefault("extensions_dir", str(Path(__file__).resolve().parents[2] / "extensions"))  # the built-ins
    return Settings(models_dir=str(models), data_dir=str(root / "data"), outdir=str(root / "outputs"),
                    max_steps=2000, preview_every=1, **kw)


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> Path:
    """A models/ tree holding one tiny random SD1 checkpoint named like the --demo model, and a tiny ControlNet
    built from its UNet (lllyasviel single-file layout), CONTROLNET_NAME."""
    from tests import controlnets, tinymodels
    root = tmp_path_factory.mktemp("ui-models")
    (root / "Stable-diffusion").mkdir()
    (root / "ControlNet").mkdir()
    tiny = tinymodels.make_tiny("sd1", seed=0)
    tinymodels.write_single_file(tiny, root / "Stable-diffusion" / DEMO_NAME)
    controlnets.write_ldm(controlnets.make_controlnet(tiny.unet, seed=1), root / "ControlNet" / CONTROLNET_NAME)
    return root


@pytest.fixture(scope="session")
def live(demo_models, tmp_path_factory):
    """(url, studio) of the main test server."""
    from studio.app import Studio
    from webui.server import build_app
    root = tmp_path_factory.mktemp("ui-live")
    studio = Studio(make_settings(root, demo_models, default_checkpoint=DEMO_NAME))
    server = RunningServer(build_app(studio, server_args()))
    yield server.url, studio
    server.stop()
    studio.queue.interrupt()
    studio.close()


@pytest.fixture(scope="session")
def empty_studio(tmp_path_factory):
    """A Studio with no checkpoint at all."""
    from studio.app import Studio
    root = tmp_path_factory.mktemp("ui-empty")
    studio = Studio(make_settings(root, root / "models"))
    yield studio
    studio.close()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def open_app(browser, url: str, **context_kw):
    """A fresh page (own context = own session) with the app loaded and ready."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, **context_kw)
    context.set_default_timeout(ACTION_TIMEOUT)
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("body[data-app-ready='1']", state="attached", timeout=120_000)
    return page


@pytest.fixture()
def page(browser, live):
    p = open_app(browser, live[0])
    yield p
    p.context.close()


@pytest.fixture()
def shoot(tmp_path):
    """shoot(page, name): a full-page screenshot in the test's tmp dir, copied to /tmp/studio-shots/."""
    def take(page, name: str) -> Path:
        path = tmp_path / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SHOTS / path.name)
        return path
    return take


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
