"""A real uvicorn server on a free port, serving the API router over the tiny models."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import SimpleNamespace
from typing import Iterator

import httpx
import pytest


def make_app(studio, auth=None):
    """The server's own app builder when it is there (API only: no gradio), else a bare FastAPI app."""
    from studio.api import build_router

    router = build_router(studio, auth=auth)
    try:
        from webui.server import build_app
    except Exception:  # noqa: BLE001 - the UI server is built elsewhere; the router is what is tested
        build_app = None
    if build_app is not None:
        return build_app(studio, SimpleNamespace(nowebui=True, api=True), extra_routers=[router])
    from fastapi import FastAPI

    app = FastAPI()
    app.include_router(router)
    return app


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="api-test-server")
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def make_studio(models_dir, data_dir, outdir):
    from studio.app import Studio
    from studio.settings import Settings

    settings = Settings(models_dir=str(models_dir), data_dir=str(data_dir), outdir=str(outdir),
                        default_checkpoint="tiny-sd1.safetensors", preview_every=1)
    return Studio(settings)


@pytest.fixture(scope="module")
def api_studio(model_store, tmp_path_factory):
    """One studio per test module (the model files are only read)."""
    tmp = tmp_path_factory.mktemp("api")
    studio = make_studio(model_store, tmp / "data", tmp / "outputs")
    yield studio
    studio.queue.interrupt()
    studio.close()


@pytest.fixture(scope="module")
def base_url(api_studio) -> Iterator[str]:
    with serve(make_app(api_studio)) as url:
        yield url


@pytest.fixture()
def client(base_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c


def tiny_body(**kw) -> dict:
    body = {"prompt": "a red house", "negative_prompt": "blurry", "seed": 1234, "steps": 3, "width": 64,
            "height": 64, "sampler_name": "Euler", "cfg_scale": 7}
    body.update(kw)
    return body
