"""The server over plain HTTP (no browser): login required with --gradio-auth, --nowebui, port in use, --listen."""
from __future__ import annotations

import socket

import httpx
import pytest

from tests.browser.conftest import RunningServer, server_args
from webui.server import build_app, listen_warnings, serve


@pytest.fixture(scope="module")
def auth_server(empty_studio):
    server = RunningServer(build_app(empty_studio, server_args(gradio_auth=[("artist", "s3cret")])))
    yield server.url
    server.stop()


def test_ui_refuses_without_credentials(auth_server):
    with httpx.Client(base_url=auth_server, follow_redirects=False, timeout=20) as anonymous:
        assert anonymous.get("/config").status_code == 401
        # the event API refuses too, so scripts cannot generate around the login page
        assert anonymous.post("/gradio_api/queue/join", json={"fn_index": 0, "data": [],
                                                               "session_hash": "x"}).status_code == 401
        assert anonymous.post("/login", data={"username": "artist", "password": "wrong"}).status_code == 400
    with httpx.Client(base_url=auth_server, timeout=20) as user:
        assert user.post("/login", data={"username": "artist", "password": "s3cret"}).status_code == 200
        config = user.get("/config")
        assert config.status_code == 200 and "components" in config.json()


def test_nowebui_serves_no_ui(empty_studio):
    server = RunningServer(build_app(empty_studio, server_args(nowebui=True)))
    try:
        root = httpx.get(server.url + "/", timeout=20)
        assert root.status_code == 200 and "nowebui" in root.json()["studio"]
        assert httpx.get(server.url + "/config", timeout=20).status_code == 404
    finally:
        server.stop()


def test_port_in_use_is_a_message_with_the_fix(empty_studio, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = serve(empty_studio.settings, server_args(port=port))
    out = capsys.readouterr().out
    assert code == 1
    assert f"Port {port}" in out and "already in use" in out and f"--port {port + 1}" in out


def test_listen_without_auth_warns():
    assert listen_warnings(server_args()) == []
    warned = " ".join(listen_warnings(server_args(listen=True, api=True)))
    assert "--gradio-auth" in warned and "--api-auth" in warned
    assert listen_warnings(server_args(listen=True, gradio_auth=[("a", "b")])) == []


def test_tabs_and_layout_do_not_import_the_ml_stack():
    import subprocess
    import sys
    code = ("import sys, tabs.txt2img, tabs.img2img, tabs.inpaint, tabs.png_info, tabs.settings, webui.layout, "
            "webui.server, studio.batch, tabs.controlnet, webui.controlnet_ui; "
            "bad = [m for m in ('torch', 'diffusers', 'peft', 'transformers') if m in sys.modules]; "
            "sys.exit(', '.join(bad) or None)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_gradio_client_txt2img_by_name(live, tmp_path):
    from gradio_client import Client
    client = Client(live[0], analytics_enabled=False, download_files=str(tmp_path), verbose=False)
    named = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert [p["parameter_name"] for p in named["/txt2img"]["parameters"]][:4] == \
        ["checkpoint", "vae", "prompt", "negative_prompt"]
    out = client.predict(prompt="via the client", steps=2, width=64, height=64, seed=7, api_name="/txt2img")
    gallery, info = out[3], out[4]
    assert len(gallery["value"]) == 1 and "via the client" in info and "Seed: 7" in info
