"""The A1111-compatible REST API (FastAPI routers). Never imports gradio.

Wire it into a FastAPI app before anything is mounted at "/"::

    from studio.api import build_router
    app.include_router(build_router(studio, auth=[("user", "pass")]))
"""
from .routes import build_router

__all__ = ["build_router"]
