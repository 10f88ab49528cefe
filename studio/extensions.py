"""Loading extensions from ``extensions/<name>/`` and calling their hooks with isolation.

An extension folder holds ``extension.toml`` (name, version, description, api_version), a Python module
(``__init__.py`` or ``main.py``) with ``@hookimpl`` functions, and optionally ``requirements.txt`` (installed
by launch.py). A failing import, a bad hook name, a wrong API major or an exception in a hook is recorded
with its traceback and shown on the Extensions tab; the studio and the job go on, except for
``studio_adjust_request``, whose failure fails the job with a message naming the extension.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import threading
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from . import hookspecs
from .errors import StudioError
from .extension_api import API_VERSION, StudioAPI

log = logging.getLogger(__name__)


@dataclass
class Extension:
    name: str
    path: Path
    version: str = ""
    description: str = ""
    api_version: str = ""
    enabled: bool = True
    status: str = "not loaded"        # loaded | disabled | error
    errors: list[str] = field(default_factory=list)
    module: Any = None

    def to_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "version": self.version, "description": self.description,
                "api_version": self.api_version, "enabled": self.enabled, "status": self.status,
                "errors": list(self.errors)}


def read_metadata(folder: Path) -> dict:
    meta_file = folder / "extension.toml"
    if not meta_file.is_file():
        return {"name": folder.name}
    with open(meta_file, "rb") as fh:
        data = tomllib.load(fh)
    return data.get("extension", data)


class ExtensionManager:
    """Discovers, loads and calls extensions. ``roots`` are folders of extension folders."""

    def __init__(self, roots: list[Path], state_file: Path, studio: Any = None):
        self.roots = [Path(r) for r in roots]
        self.state_file = Path(state_file)
        self.studio = studio
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.extensions: dict[str, Extension] = {}
        self._lock = threading.Lock()

    # ---- state ---------------------------------------------------------------------------------------------
    def _disabled(self) -> set[str]:
        try:
            return set(json.loads(self.state_file.read_text()).get("disabled", []))
        except (OSError, ValueError):
            return set()

    def set_enabled(self, name: str, enabled: bool) -> None:
        """Persist enable/disable; it takes effect when the studio (UI) is reloaded."""
        disabled = self._disabled()
        (disabled.discard if enabled else disabled.add)(name)
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"disabled": sorted(disabled)}, indent=2))
        os.replace(tmp, self.state_file)
        if name in self.extensions:
            self.extensions[name].enabled = enabled

    # ---- loading -------------------------------------------------------------------------------------------
    def discover(self) -> list[Extension]:
        found: dict[str, Extension] = {}
        disabled = self._disabled()
        for root in self.roots:
            if not root.is_dir():
                continue
            for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
                try:
                    meta = read_metadata(folder)
                except (OSError, tomllib.TOMLDecodeError) as exc:
                    ext = Extension(folder.name, folder, status="error", errors=[f"extension.toml: {exc}"])
                else:
                    ext = Extension(str(meta.get("name", folder.name)), folder, str(meta.get("version", "")),
                                    str(meta.get("description", "")), str(meta.get("api_version", "")))
                ext.enabled = ext.name not in disabled
                found.setdefault(ext.name, ext)
        return list(found.values())

    def load_all(self) -> list[Extension]:
        """Import every enabled extension and register its hooks (validated against the specs)."""
        for ext in self.discover():
            self.extensions[ext.name] = ext
            if not ext.enabled:
                ext.status = "disabled"
                continue
            if ext.status == "error":
                continue
            self._load(ext)
        return list(self.extensions.values())

    def _load(self, ext: Extension) -> None:
        wanted = ext.api_version.split(".")[0] if ext.api_version else API_VERSION.split(".")[0]
        if wanted != API_VERSION.split(".")[0]:
            ext.status = "error"
            ext.errors.append(f"needs extension API {ext.api_version}; this studio has {API_VERSION}")
            return
        entry = next((ext.path / n for n in ("__init__.py", "main.py") if (ext.path / n).is_file()), None)
        if entry is None:
            ext.status, ext.errors = "error", ["no __init__.py or main.py in the folder"]
            return
        module_name = f"studio_extension_{ext.path.name.replace('-', '_')}"
        try:
            spec = importlib.util.spec_from_file_location(module_name, entry,
                                                          submodule_search_locations=[str(ext.path)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
            self.pm.register(module, name=ext.name)
            self.pm.check_pending()  # a hookimpl with an unknown name fails here, at load time
        except Exception as exc:  # noqa: BLE001 - an extension must never stop the studio
            if self.pm.get_plugin(ext.name) is not None:
                self.pm.unregister(name=ext.name)
            ext.status = "error"
            ext.errors.append("".join(traceback.format_exception(exc)).strip())
            log.error("Extension %s failed to load: %s", ext.name, exc)
            return
        ext.module, ext.status = module, "loaded"
        log.info("Extension %s %s loaded", ext.name, ext.version)

    # ---- calling -------------------------------------------------------------------------------------------
    def api(self, extension: str = "") -> StudioAPI:
        return StudioAPI(self.studio, extension)

    def _impls(self, hook: str) -> list:
        return list(reversed(getattr(self.pm.hook, hook).get_hookimpls()))  # registration order

    def call(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call every implementation; a failing one is recorded and skipped. Returns [(extension, result)]."""
        out = []
        for impl in self._impls(hook):
            try:
                result = impl.function(**{k: v for k, v in {"api": self.api(impl.plugin_name), **kwargs}.items()
                                          if k in impl.argnames})
            except Exception as exc:  # noqa: BLE001 - isolation: report, skip, go on
                self._record(impl.plugin_name, hook, exc)
                continue
            if result is not None:
                out.append((impl.plugin_name, result))
        return out

    def collect(self, hook: str) -> list[tuple[str, Any]]:
        """Flatten list results of a "return a list of specs" hook."""
        return [(name, item) for name, items in self.call(hook) for item in (items or [])]

    def adjust_request(self, request: Any) -> Any:
        """Run studio_adjust_request in order; a failure fails the job naming the extension."""
        for impl in self._impls("studio_adjust_request"):
            try:
                changed = impl.function(**{k: v for k, v in {"api": self.api(impl.plugin_name),
                                                                "request": request}.items() if k in impl.argnames})
            except Exception as exc:  # noqa: BLE001
                self._record(impl.plugin_name, "studio_adjust_request", exc)
                raise StudioError(f"Extension '{impl.plugin_name}' failed while adjusting the request: {exc}",
                                  fix=f"disable '{impl.plugin_name}' on the Extensions tab, or fix it") from exc
            if changed is not None:
                if not hasattr(changed, "validate"):
                    raise StudioError(f"Extension '{impl.plugin_name}' returned {type(changed).__name__} from "
                                      "studio_adjust_request instead of a GenerationRequest.")
                request = changed
        return request

    def _record(self, name: str, hook: str, exc: BaseException) -> None:
        text = f"{hook}: " + "".join(traceback.format_exception(exc)).strip()
        log.error("Extension %s failed in %s: %s", name, hook, exc)
        with self._lock:
            ext = self.extensions.get(name)
            if ext is not None:
                ext.errors = (ext.errors + [text])[-20:]

    def has(self, hook: str) -> bool:
        return bool(getattr(self.pm.hook, hook).get_hookimpls())
