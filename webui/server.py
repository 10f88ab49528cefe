"""The server: one FastAPI app with the REST routers first and the Gradio UI mounted at "/", run by uvicorn.

``launch.py`` calls :func:`serve`; tests call :func:`build_app` with their own Studio and run uvicorn in a thread.
Gradio is imported only here, at serve time, so ``launch.py --help`` and the setup stay light; torch, diffusers and
transformers only once the port answers (``Studio.warm_up`` in a thread), so the UI is up seconds sooner.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Iterable

log = logging.getLogger(__name__)

DEFAULT_PORT = 7860


def say(message: str) -> None:
    print(f"[studio] {message}", flush=True)


def build_app(studio: Any, args: Any = None, *, extra_routers: Iterable[Any] = ()) -> Any:
    """FastAPI app: ``extra_routers`` (e.g. the /sdapi/v1 router) are added BEFORE the UI is mounted at "/",
    because a route added after a mount at "/" is shadowed by it (404)."""
    from fastapi import FastAPI

    from webui.auth import AuthGate, gradio_user

    app = FastAPI(title="Studio", docs_url="/docs", redoc_url=None)
    docs_routes = list(app.routes)
    for router in extra_routers:
        app.include_router(router)
    api_routes = [route for route in app.routes if route not in docs_routes]  # they check --api-auth themselves
    credentials = _credentials(getattr(args, "api_auth", None))
    if getattr(args, "nowebui", False):
        @app.get("/", include_in_schema=False)
        def root() -> dict:
            return {"studio": "API only (started with --nowebui)", "docs": "/docs"}
        app.add_middleware(AuthGate, api_routes=api_routes, ui_user=None, api_credentials=credentials,
                           everything_basic=True)
        return app

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no network calls
    import gradio as gr

    from webui.layout import CSS, build_blocks

    blocks = build_blocks(studio)
    # default 1 for plain events; device events share concurrency_id="gpu" and are serialised by the engine queue
    blocks.queue(default_concurrency_limit=1)
    auth = getattr(args, "gradio_auth", None) or None
    app = gr.mount_gradio_app(app, blocks, path="/", auth=auth, css=CSS, show_error=True,
                              auth_message="Log in to the studio (started with --gradio-auth)." if auth else None,
                              footer_links=["api", "settings"])
    ui_user = gradio_user(app.routes[-1].app) if auth else None  # the gradio app mounted at "/" last
    app.add_middleware(AuthGate, api_routes=api_routes, ui_user=ui_user, api_credentials=credentials)
    return app


def _credentials(auth: Any) -> list[tuple[str, str]]:
    if not auth:
        return []
    from studio.api.errors import normalise_credentials
    return normalise_credentials(auth)

def api_routers(studio: Any, args: Any) -> list:
    """The REST routers when --api / --nowebui: ``studio.api.build_router(studio[, auth=...])`` when present,
    then the extensions' routers."""
    if not (getattr(args, "api", False) or getattr(args, "nowebui", False)):
        return []
    try:
        module = importlib.import_module("studio.api")
    except ModuleNotFoundError:
        say("Note: --api was given but the REST API (studio/api) is not in this checkout yet; serving the UI only.")
        return []
    build_router = module.build_router
    kwargs = {}
    if "auth" in inspect.signature(build_router).parameters:
        kwargs["auth"] = getattr(args, "api_auth", None)
    routers = build_router(studio, **kwargs)
    routers = list(routers) if isinstance(routers, (list, tuple)) else [routers]
    from studio.api.extensions import extension_routers  # studio_api_routes, behind the same auth
    return routers + extension_routers(studio, auth=getattr(args, "api_auth", None))


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn, so a taken port becomes a clear message instead of uvicorn's exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if os.name != "nt":  # like uvicorn: a port left in TIME_WAIT by a previous run is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def port_in_use_message(host: str, port: int, exc: OSError) -> str:
    return (f"Port {port} on {host} is already in use or not available ({exc.strerror or exc}). Fix: stop the "
            f"program using it (another studio or A1111?), or start with --port {port + 1} (any free port).")


def listen_warnings(args: Any) -> list[str]:
    """A server reachable from the network without a password deserves a loud warning."""
    if not getattr(args, "listen", False):
        return []
    out = []
    if not getattr(args, "nowebui", False) and not getattr(args, "gradio_auth", None):
        out.append("WARNING: --listen makes the web UI reachable from your network without a password. "
                   "Add --gradio-auth user:password to require a login.")
    if (getattr(args, "api", False) or getattr(args, "nowebui", False)) and not getattr(args, "api_auth", None):
        out.append("WARNING: --listen makes the API reachable from your network without a password. "
                   "Add --api-auth user:password to require credentials.")
    return out


def serve(settings: Any, args: Any) -> int:
    """Build the Studio, serve UI (+ API) until Ctrl+C. Returns a process exit code.

    ``args`` is launch.py's namespace: host / port (or listen / port), nowebui, api, gradio_auth, api_auth.
    """
    host = getattr(args, "host", None)
    if host is None:  # launch.py resolves host and prints these warnings itself; a direct caller gets them here
        host = "0.0.0.0" if getattr(args, "listen", False) else "127.0.0.1"
        for warning in listen_warnings(args):
            say(warning)
    port = getattr(args, "port", None) or DEFAULT_PORT
    try:
        sock = bind_socket(host, port)
    except OSError as exc:
        say(port_in_use_message(host, port, exc))
        return 1
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[studio] %(levelname)s %(name)s: %(message)s")

    started = time.monotonic()
    from studio.app import Studio  # torch-free: _announce imports torch once the port answers
    studio = Studio(settings)
    try:
        app = build_app(studio, args, extra_routers=api_routers(studio, args))
        import uvicorn
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        threading.Thread(target=_announce, args=(server, studio, host, port, args, started), daemon=True,
                         name="studio-announce").start()
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        studio.queue.interrupt()
        studio.close()
    return 0


def _announce(server: Any, studio: Any, host: str, port: int, args: Any, started: float) -> None:
    """Say where to go once uvicorn accepts connections; then import torch & co. and warm the default checkpoint
    in the queue."""
    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.05)
    shown = "127.0.0.1" if host in ("127.0.0.1", "localhost") else host
    say(f"Running on http://{shown}:{port} (ready in {time.monotonic() - started:.1f} s)")
    if host == "0.0.0.0":
        say(f"On this machine: http://127.0.0.1:{port}")
    if getattr(args, "api", False) or getattr(args, "nowebui", False):
        say(f"API docs: http://{shown}:{port}/docs")
    try:
        studio.warm_up()
    except Exception as exc:  # noqa: BLE001 - e.g. --device cuda without CUDA; Generate shows the same error
        say(f"Error: {exc}")
        return
    if not studio.registry.checkpoints():
        say(f"No checkpoint in {studio.settings.ckpt_path}: drop a .safetensors file there, start with "
            "--ckpt-dir pointing at an A1111 models/Stable-diffusion folder, or try the demo model (a toy that "
            "draws coloured shapes): press \"Install the demo model\" on the page, or start with "
            "`python launch.py --demo`.")
        return
    from webui.common import current_checkpoint_title
    title = current_checkpoint_title(studio)
    try:  # loading now makes the first Generate fast; a Generate clicked meanwhile queues behind it
        say(f"Loaded checkpoint {studio.switch_checkpoint(title)}")
    except Exception as exc:  # noqa: BLE001 - the UI shows the same error on Generate; keep serving
        say(f"Could not load checkpoint {title!r}: {exc}")


if __name__ == "__main__":  # pragma: no cover - launch.py is the entry point
    sys.exit("Start the studio with: python launch.py")
