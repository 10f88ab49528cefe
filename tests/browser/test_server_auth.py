"""--gradio-auth / --api-auth leave nothing open: every route answers 401 without credentials, 200 with them."""
from __future__ import annotations

import httpx
import pytest

from tests.browser.conftest import RunningServer, make_settings, server_args

CKPT = "secret-model-name.safetensors"
UI = ("artist", "s3cret")
API = ("robot", "b33p")


@pytest.fixture(scope="module")
def named_studio(tmp_path_factory):
    """A studio whose only checkpoint has a name the login page must not give away (the file is never loaded)."""
    from studio.app import Studio
    root = tmp_path_factory.mktemp("auth")
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    (root / "models" / "Stable-diffusion" / CKPT).write_bytes(b"not loaded")
    studio = Studio(make_settings(root, root / "models"))
    yield studio
    studio.close()


def start(studio, **kw) -> RunningServer:
    from webui.server import api_routers, build_app
    args = server_args(**kw)
    return RunningServer(build_app(studio, args, extra_routers=api_routers(studio, args)))


@pytest.fixture(scope="module")
def both(named_studio):
    server = start(named_studio, api=True, gradio_auth=[UI], api_auth=[API])
    yield server.url
    server.stop()


# every route that answered without credentials before, plus the ones gradio itself guards
GUARDED = [("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/gradio_api/reset"),
           ("GET", "/gradio_api/heartbeat/abc123"), ("GET", "/config"), ("GET", "/gradio_api/info"),
           ("GET", "/sdapi/v1/sd-models")]


def request(client: httpx.Client, method: str, path: str) -> httpx.Response:
    if method == "POST":
        return client.post(path, json={"session_hash": "abc123", "fn_index": 0, "event_id": "x"})
    if "heartbeat" in path:  # an event stream: the status line is enough
        with client.stream("GET", path) as resp:
            return resp
    return client.get(path)


@pytest.mark.parametrize("method,path", GUARDED)
def test_refused_without_credentials(both, method, path):
    with httpx.Client(base_url=both, follow_redirects=False, timeout=30) as anonymous:
        resp = request(anonymous, method, path)
        assert resp.status_code == 401, (path, resp.status_code, resp.text[:300])


def test_login_page_does_not_name_the_checkpoints(both):
    with httpx.Client(base_url=both, timeout=30) as anonymous:
        page = anonymous.get("/")
        assert page.status_code == 200 and "auth_required" in page.text  # gradio's login page
        assert CKPT.split(".")[0] not in page.text and "txt2img" not in page.text
        assert anonymous.head("/").status_code == 200
    with httpx.Client(base_url=both, timeout=30) as user:
        assert user.post("/login", data={"username": UI[0], "password": UI[1]}).status_code == 200
        assert CKPT.split(".")[0] in user.get("/").text


@pytest.mark.parametrize("method,path", GUARDED[:-1])
def test_ui_login_opens_the_ui_and_the_docs(both, method, path):
    with httpx.Client(base_url=both, timeout=30) as user:
        assert user.post("/login", data={"username": UI[0], "password": UI[1]}).status_code == 200
        resp = request(user, method, path)
        assert resp.status_code == 200, (path, resp.status_code, resp.text[:300])


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/sdapi/v1/sd-models"])
def test_api_credentials_open_the_api_and_the_docs(both, path):
    with httpx.Client(base_url=both, timeout=30) as robot:
        assert robot.get(path, auth=API).status_code == 200
        assert robot.get(path, auth=(API[0], "wrong")).status_code == 401
        assert robot.get(path, auth=UI).status_code == 401  # the UI account is not an API account


def test_api_auth_alone_guards_the_docs_not_the_open_ui(named_studio):
    server = start(named_studio, api=True, api_auth=[API])
    try:
        with httpx.Client(base_url=server.url, timeout=30) as anonymous:
            for path in ("/docs", "/openapi.json", "/sdapi/v1/sd-models"):
                resp = anonymous.get(path)
                assert resp.status_code == 401 and resp.headers["www-authenticate"].startswith("Basic"), path
                assert anonymous.get(path, auth=API).status_code == 200, path
            assert anonymous.get("/config").status_code == 200  # no --gradio-auth: the UI is open by choice
    finally:
        server.stop()


def test_nowebui_with_api_auth_guards_everything(named_studio):
    server = start(named_studio, nowebui=True, api=True, api_auth=[API])
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for path in ("/", "/docs", "/openapi.json", "/sdapi/v1/sd-models"):
                assert client.get(path).status_code == 401, path
                assert client.get(path, auth=API).status_code == 200, path
    finally:
        server.stop()


def test_browser_login_shows_txt2img(browser, both):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        page.goto(both)
        page.wait_for_selector("input[type=password]", timeout=60_000)
        page.fill("input[type=text]", UI[0])
        page.fill("input[type=password]", UI[1])
        page.keyboard.press("Enter")
        page.wait_for_selector("body[data-app-ready='1']", state="attached", timeout=60_000)
        page.get_by_role("tab", name="txt2img").wait_for(timeout=30_000)
        assert page.get_by_role("tab", name="txt2img").is_visible()
    finally:
        context.close()

