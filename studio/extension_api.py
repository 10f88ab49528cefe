"""The public surface for extensions: import only this module. ``API_VERSION`` follows semver:
a new minor adds hooks or fields; a new major may remove or change them (extensions declare the major
they were written for in ``extension.toml`` as ``api_version``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from .errors import StudioError
from .request import GenerationRequest, GenerationResult

API_VERSION = "1.1"
hookimpl = pluggy.HookimplMarker("studio")


@dataclass(frozen=True)
class TabSpec:
    """A UI tab. ``build(api)`` runs inside the tab's layout context (it may create Gradio components)."""

    title: str
    build: Callable[["StudioAPI"], Any]
    elem_id: str = ""


@dataclass(frozen=True)
class ParamSpec:
    """A numeric parameter of a preprocessor (shown as a slider)."""

    name: str
    label: str
    minimum: float
    maximum: float
    default: float
    step: float = 1.0


@dataclass(frozen=True)
class PreprocessorSpec:
    """A ControlNet preprocessor: ``fn(image: PIL.Image, resolution: int, **params) -> PIL.Image``."""

    name: str
    fn: Callable[..., Any]
    params: tuple[ParamSpec, ...] = ()
    resolution: int = 512


@dataclass(frozen=True)
class UpscalerSpec:
    """An image upscaler for hires fix: ``fn(image: PIL.Image, width: int, height: int) -> PIL.Image``."""

    name: str
    fn: Callable[[Any, int, int], Any]


@dataclass(frozen=True)
class SettingSpec:
    """A setting an extension adds (shown on the Extensions tab, saved with the studio's settings)."""

    key: str
    default: Any
    label: str = ""


@dataclass
class StepContext:
    """One sampling step of a running job."""

    step: int
    total: int
    latents: Any
    request: GenerationRequest
    job_id: str = ""
    _stop: bool = field(default=False, repr=False)

    def stop(self) -> None:
        """End the job after this step (images made so far are kept)."""
        self._stop = True


@dataclass
class ImageContext:
    """An image that was just made, before it is saved."""

    image: Any
    request: GenerationRequest
    seed: int
    index: int
    params: dict            # the infotext key/values written so far (read-only view for the hook)


@dataclass(frozen=True)
class SavedImage:
    path: str
    infotext: str
    request: GenerationRequest


@dataclass(frozen=True)
class ModelInfo:
    name: str
    title: str
    family: str
    hash: str


class StudioAPI:
    """What an extension may do with the studio (handed to every hook as ``api``)."""

    def __init__(self, studio: Any, extension: str = ""):
        self._studio = studio
        self.extension = extension

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run a generation through the shared queue. Call it from a tab's event handler or a thread –
        never from inside a hook that runs during a job (that would wait for itself)."""
        return self._studio.generate(request)

    def submit(self, request: GenerationRequest) -> Any:
        """Queue a generation and return its Job at once (``progress``, ``preview``, ``wait()``, ``interrupt()``)."""
        return self._studio.submit(request)

    def loras(self) -> list[str]:
        """Names usable in ``<lora:name:weight>`` tags."""
        return [entry.name for entry in self._studio.loras.entries()]

    def report_error(self, exc: BaseException, where: str = "") -> None:
        """Show an error of this extension on the Extensions tab (with its traceback) and in the log."""
        self._studio.extensions.record_error(self.extension, where or "extension", exc)

    def checkpoints(self) -> list[str]:
        return [info.title for info in self._studio.registry.checkpoints()]

    def samplers(self) -> list[str]:
        from .samplers import SAMPLERS
        return list(SAMPLERS)

    def schedulers(self) -> list[str]:
        from .samplers import SCHEDULE_TYPES
        return list(SCHEDULE_TYPES)

    def save_grid(self, image: Any, *, mode: str = "txt2img", infotext: str = "") -> str:
        """Save an image under outputs/<mode>-grids/YYYY-MM-DD/ (A1111's grid folders); returns the path."""
        return str(self._studio.outputs.save(image, mode=mode, seed=0, infotext=infotext, kind="grids"))

    def setting(self, key: str, default: Any = None) -> Any:
        """A setting's saved value; else ``default``; else the default its SettingSpec declared."""
        if default is None:
            default = self._studio.extensions.setting_default(key)
        return self._studio.settings.extension_settings.get(key, default)

    def parse_infotext(self, text: str) -> dict:
        """Infotext -> GenerationRequest field values."""
        from .infotext import params_to_request_fields, parse_infotext
        return params_to_request_fields(parse_infotext(text))

    @property
    def outputs_dir(self) -> str:
        return str(self._studio.settings.outdir)

    def confine_path(self, path: str, field: str) -> str:
        """A server path a request named (a route's body, a tab's text box), resolved, if it lies inside the
        studio's folders (models, model folders, data, outputs); else a StudioError naming ``field`` (a 422)."""
        return str(self._studio.training.confine(path, field))


__all__ = ["API_VERSION", "hookimpl", "GenerationRequest", "GenerationResult", "StudioError", "TabSpec", "ParamSpec",
           "PreprocessorSpec", "UpscalerSpec", "SettingSpec", "StepContext", "ImageContext", "SavedImage",
           "ModelInfo", "StudioAPI"]
