"""Loading extensions from ``extensions/<name>/`` and calling their hooks with isolation.

An extension folder holds ``extension.toml`` (name, version, description, api_version), a Python module
(``__init__.py`` or ``main.py``) with ``@hookimpl`` functions, and optionally ``requirements.txt`` (installed
by launch.py). A failing import, a bad hook name, a wrong API major or an exception in a hook is recorded
with its traceback and shown on the Extensions tab; the studio and the job go on, except for
``studio_adjust_request``, whose failure fails the job with a message naming the extension.
Installing (from a local folder or a zip, offline) copies into the first extensions folder; it loads at the
next start, like enabling / disabling.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import tomllib
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from . import hookspecs
from .errors import StudioError
from .extension_api import API_VERSION, StudioAPI

log = logging.getLogger(__name__)

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_ZIP_BYTES = 512 << 20          # uncompressed size limit of an uploaded extension (zip bombs)
_COPY_IGNORE = shutil.ignore_patterns(".git", "__pycache__", "*.pyc")


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
        self._setting_specs: list | None = None

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

    def record_error(self, name: str, hook: str, exc: BaseException) -> None:
        """Keep an extension's failure (with traceback) for the Extensions tab, and log it."""
        self._record(name, hook, exc)

    def _record(self, name: str, hook: str, exc: BaseException) -> None:
        text = f"{hook}: " + "".join(traceback.format_exception(exc)).strip()
        log.error("Extension %s failed in %s: %s", name, hook, exc)
        with self._lock:
            ext = self.extensions.get(name)
            if ext is not None:
                ext.errors = (ext.errors + [text])[-20:]

    def has(self, hook: str) -> bool:
        return bool(getattr(self.pm.hook, hook).get_hookimpls())

    # ---- settings ------------------------------------------------------------------------------------------
    def setting_specs(self) -> list[tuple[str, Any]]:
        """[(extension, SettingSpec)] of studio_settings, asked once (extensions are loaded once per run)."""
        if self._setting_specs is None:
            self._setting_specs = [(name, spec) for name, spec in self.collect("studio_settings")
                                   if getattr(spec, "key", "")]
        return self._setting_specs

    def setting_default(self, key: str) -> Any:
        return next((spec.default for _, spec in self.setting_specs() if spec.key == key), None)

    def save_settings(self, values: dict) -> Path:
        """Store extension settings in the live settings and in the settings file (keeping what it holds)."""
        from .settings import Settings

        live = self.studio.settings
        stored, _ = Settings.load(live.data_dir)  # the file, without this run's command-line flags
        path = stored.replace(extension_settings={**stored.extension_settings, **values}).save()
        live.extension_settings.update(values)
        return path

    # ---- installing ----------------------------------------------------------------------------------------
    @property
    def install_root(self) -> Path:
        return self.roots[0]

    def install_from_folder(self, source: str | os.PathLike) -> Extension:
        """Copy a local extension folder into the extensions folder (loaded at the next start)."""
        src = Path(source).expanduser().resolve()
        if not src.is_dir():
            raise StudioError(f"{src} is not a folder.", fix="give the path of an extension folder")
        if self.install_root.resolve() in (src, *src.parents):
            raise StudioError(f"{src} is already inside the extensions folder.")
        _check_extension_folder(src)
        return self._place(src, lambda dst: shutil.copytree(src, dst, ignore=_COPY_IGNORE), src.name)

    def install_from_zip(self, archive: str | os.PathLike) -> Extension:
        """Unpack a zip (files at its root, or in one top folder as GitHub's zips have) into the extensions
        folder. Entries with absolute paths or ``..`` are refused before anything is written (zip-slip)."""
        archive = Path(archive)
        try:
            zf = zipfile.ZipFile(archive)
        except (OSError, zipfile.BadZipFile) as exc:
            raise StudioError(f"{archive.name} is not a readable zip file ({exc}).") from exc
        with zf, tempfile.TemporaryDirectory(prefix=".unzip-", dir=self._ensure_root()) as tmp:
            _safe_extract(zf, Path(tmp))
            entries = [p for p in Path(tmp).iterdir() if not p.name.startswith("__MACOSX")]
            top = entries[0] if len(entries) == 1 and entries[0].is_dir() else Path(tmp)
            _check_extension_folder(top)
            fallback = top.name if top != Path(tmp) else archive.stem
            return self._place(top, lambda dst: shutil.copytree(top, dst, ignore=_COPY_IGNORE), fallback)

    def _ensure_root(self) -> Path:
        self.install_root.mkdir(parents=True, exist_ok=True)
        return self.install_root

    def _place(self, src: Path, put: Any, fallback: str) -> Extension:
        try:
            meta = read_metadata(src)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise StudioError(f"extension.toml of {fallback} cannot be read: {exc}") from exc
        name = str(meta.get("name") or fallback)
        folder = name if SAFE_NAME.match(name) else fallback
        if not SAFE_NAME.match(folder):
            raise StudioError(f"Extension name {name!r} cannot be a folder name.",
                              fix="use letters, digits, '_', '-' and '.' in extension.toml's name")
        dst = self._ensure_root() / folder
        taken = {e.name for e in self.discover()} | set(self.extensions)
        if dst.exists() or name in taken:
            raise StudioError(f"An extension named {name!r} is already installed ({dst}).",
                              fix="remove or rename the installed one first")
        staging = self.install_root / f".installing-{folder}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            put(staging)
            os.replace(staging, dst)  # the folder appears whole or not at all
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        ext = next(e for e in self.discover() if e.path == dst)
        ext.status = "installed (restart to load)"
        self.extensions.setdefault(ext.name, ext)
        log.info("Extension %s installed into %s", ext.name, dst)
        return ext

    def listing(self) -> list[Extension]:
        """Loaded extensions plus any installed since start."""
        for ext in self.discover():
            if ext.name not in self.extensions:
                ext.status = "installed (restart to load)"
                self.extensions[ext.name] = ext
        return list(self.extensions.values())

    def requirements_files(self) -> list[Path]:
        """requirements.txt of every enabled extension (launch.py installs them; no extension code runs)."""
        return [e.path / "requirements.txt" for e in self.discover()
                if e.enabled and (e.path / "requirements.txt").is_file()]


def _check_extension_folder(folder: Path) -> None:
    if not any((folder / n).is_file() for n in ("extension.toml", "__init__.py", "main.py")):
        raise StudioError(f"{folder.name} does not look like an extension: no extension.toml, __init__.py or "
                          "main.py at its top.", fix="point at the folder that holds extension.toml")


def _safe_extract(zf: zipfile.ZipFile, dest: Path) -> None:
    """Check every entry first: absolute paths, drive letters, '..' parts, links and oversized archives."""
    total = 0
    for info in zf.infolist():
        name = info.filename.replace("\\", "/")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
            raise StudioError(f"Refused: the zip entry {info.filename!r} would be written outside the "
                              "extension folder.", fix="only install zips you trust; this one is malformed")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise StudioError(f"Refused: the zip entry {info.filename!r} is a symbolic link.")
        total += info.file_size
    if total > MAX_ZIP_BYTES:
        raise StudioError(f"Refused: the zip unpacks to {total >> 20} MB (limit {MAX_ZIP_BYTES >> 20} MB).")
    zf.extractall(dest)
