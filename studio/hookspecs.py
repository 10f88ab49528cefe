"""The one place where extension hooks are declared (pluggy hook specifications).

Each hook's arguments are the public types of ``studio.extension_api``; an extension implements any subset
with ``@hookimpl``. Hook names and argument names are checked when an extension is loaded.
"""
from __future__ import annotations

import pluggy

PROJECT = "studio"
hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec
def studio_tabs(api):
    """Add UI tabs: return a list of TabSpec(title, build) – build(api) is called inside the new tab."""


@hookspec
def studio_preprocessors(api):
    """Add ControlNet preprocessors: return a list of PreprocessorSpec(name, fn, params)."""


@hookspec
def studio_upscalers(api):
    """Add image upscalers for hires fix: return a list of UpscalerSpec(name, fn(image, width, height))."""


@hookspec
def studio_api_routes(api):
    """Add REST routes: return a list of fastapi.APIRouter (mounted with the API's auth)."""


@hookspec
def studio_settings(api):
    """Add settings: return a list of SettingSpec(key, default, label); values live in api.setting(key)."""


@hookspec
def studio_adjust_request(api, request):
    """Change a GenerationRequest before it runs: return a new request or None (a failure fails the job)."""


@hookspec
def studio_on_step(api, step):
    """Per sampling step: ``step`` is a StepContext (step, total, latents, request); step.stop() ends the job."""


@hookspec
def studio_after_image(api, image):
    """After an image is made, before saving: ``image`` is an ImageContext; return extra infotext keys or None."""


@hookspec
def studio_image_saved(api, saved):
    """After an image is written: ``saved`` is a SavedImage (path, infotext, request)."""


@hookspec
def studio_model_loaded(api, model):
    """After a checkpoint is loaded: ``model`` is a ModelInfo (name, title, family, hash)."""
