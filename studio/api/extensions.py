"""REST routes added by extensions (``studio_api_routes``), behind the same HTTP basic auth as the API."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from .errors import auth_dependency, normalise_credentials


def extension_routers(studio: Any, *, auth: Any = None) -> list[APIRouter]:
    """One router per extension router, with the API's auth dependency when ``auth`` is given."""
    manager = getattr(studio, "extensions", None)
    if manager is None:
        return []
    credentials = normalise_credentials(auth)
    dependencies = [Depends(auth_dependency(credentials))] if credentials else []
    out = []
    for name, router in manager.collect("studio_api_routes"):
        if not isinstance(router, APIRouter):
            manager.record_error(name, "studio_api_routes", TypeError(
                f"returned {type(router).__name__}; expected fastapi.APIRouter"))
            continue
        wrapper = APIRouter(dependencies=dependencies, tags=[f"extension: {name}"])
        wrapper.include_router(router)
        out.append(wrapper)
    return out
