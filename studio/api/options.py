"""The API's options (GET/POST /sdapi/v1/options): a few that act, every other key kept and persisted.

Options that act:
- ``sd_model_checkpoint``: POST switches the model through the queue (``Studio.switch_checkpoint``); GET shows
  the current one. Not stored here: the pipeline manager knows what is current.
- ``sd_vae``: the VAE for API requests that do not override it ("Automatic", "None" or a file in the VAE folder).
- ``CLIP_stop_at_last_layers``: the clip skip for API requests that do not override it.
Every other A1111 option key (:mod:`.a1111_options`), extension setting key or key stored before is type-checked
and stored as given in ``<data_dir>/api-options.json`` (written atomically) and returned by GET; an unknown key,
a value of the wrong type or an oversized value is a 422 naming the key.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import StudioError

log = logging.getLogger(__name__)

FILE_NAME = "api-options.json"
# keys the manager owns (what is loaded): never stored
OVERRIDE_CHECKPOINT_KEYS = ("sd_model_checkpoint", "sd_checkpoint_hash")


class OptionsStore:
    def __init__(self, data_dir: str | os.PathLike):
        self.path = Path(data_dir) / FILE_NAME
        self._lock = threading.Lock()
        self._data: dict[str, Any] = self._read()

    def _read(self) -> dict:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("top level is not an object")
            return data
        except (OSError, ValueError) as exc:
            backup = self.path.with_name(f"api-options.broken-{time.strftime('%Y%m%d-%H%M%S')}.json")
            try:
                os.replace(self.path, backup)
            except OSError:
                backup = None
            log.warning("API options file %s could not be read (%s); starting empty%s.", self.path, exc,
                        f" (backed up to {backup})" if backup else "")
            return {}

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self._data.get(key, default)

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._data)

    def update(self, values: dict) -> None:
        with self._lock:
            merged = {**self._data, **values}
            try:
                text = json.dumps(merged, indent=2, sort_keys=True, ensure_ascii=False)
            except (TypeError, ValueError) as exc:  # JSON bodies always serialise; guard direct callers
                raise StudioError(f"Options could not be stored: {exc}.", field="options") from None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.path)
            self._data = merged


MAX_OPTION_CHARS = 65536   # one value as JSON; A1111's largest (lists of names) are far smaller
_TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "text", list: "a list"}


def check_option(key: Any, value: Any, known: dict[str, type | None]) -> Any:
    """``value`` checked for option ``key`` (``known``: key -> type of its default, None = any JSON)."""
    if key not in known:
        raise StudioError(f"Unknown option {str(key)[:100]!r}.", field=str(key)[:100],
                          fix="use an A1111 option key (GET /sdapi/v1/options lists the current ones) or a "
                              "setting key an extension declared")
    try:
        text = json.dumps(value, ensure_ascii=False)
        text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:   # UnicodeEncodeError: a lone surrogate
        raise StudioError(f"Option '{key}' cannot be stored: {exc}.", field=key,
                          fix="send plain JSON text (valid UTF-8)") from None
    if len(text) > MAX_OPTION_CHARS:
        raise StudioError(f"Option '{key}' is {len(text)} characters as JSON; the limit is {MAX_OPTION_CHARS}.",
                          field=key, fix="send a smaller value")
    kind = known[key]
    if kind is None or value is None and kind is str:
        return value
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise StudioError(f"Option '{key}' must be {_TYPE_NAMES[kind]}, got {value!r:.80}.", field=key)
    return value


def check_clip_skip(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise StudioError(f"'{field}' must be a whole number from 1 to 12, got {value!r}.", field=field)
    value = int(value)
    if not 1 <= value <= 12:
        raise StudioError(f"'{field}' is {value}; it must be from 1 to 12.", field=field,
                          fix="1 uses the last CLIP layer, 2 the one before (usual for anime models)")
    return value


def check_text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise StudioError(f"'{field}' must be a non-empty name, got {value!r}.", field=field)
    return value
