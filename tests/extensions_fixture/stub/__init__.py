"""A test extension implementing every hook, recording calls in a list the test can read."""
from studio.extension_api import (ParamSpec, PreprocessorSpec, SettingSpec, TabSpec, UpscalerSpec, hookimpl)

CALLS: list = []


@hookimpl
def studio_tabs(api):
    CALLS.append("studio_tabs")
    return [TabSpec("Stub tab", lambda api: CALLS.append("tab_built"), elem_id="stub_tab")]


@hookimpl
def studio_preprocessors(api):
    CALLS.append("studio_preprocessors")
    return [PreprocessorSpec("stub_invert", lambda image, resolution, **kw: image.point(lambda v: 255 - v),
                             (ParamSpec("strength", "Strength", 0, 1, 1, 0.1),))]


@hookimpl
def studio_upscalers(api):
    CALLS.append("studio_upscalers")
    return [UpscalerSpec("Stub nearest", lambda image, w, h: image.resize((w, h), 0))]


@hookimpl
def studio_api_routes(api):
    from fastapi import APIRouter
    CALLS.append("studio_api_routes")
    router = APIRouter()
    router.add_api_route("/stub/ping", lambda: {"pong": True, "ext": api.extension}, methods=["GET"])
    return [router]


@hookimpl
def studio_settings(api):
    CALLS.append("studio_settings")
    return [SettingSpec("stub_greeting", "hello", "Greeting")]


@hookimpl
def studio_adjust_request(api, request):
    CALLS.append("studio_adjust_request")
    if "[stub-steps]" in request.prompt:
        return request.replace(prompt=request.prompt.replace("[stub-steps]", "").strip(), steps=2)
    return None


@hookimpl
def studio_on_step(api, step):
    CALLS.append(("studio_on_step", step.step, step.total))
    if "stop-early" in step.request.prompt and step.step >= 2:
        step.stop()


@hookimpl
def studio_after_image(api, image):
    CALLS.append("studio_after_image")
    return {"Stub": f"seed {image.seed}"}


@hookimpl
def studio_image_saved(api, saved):
    CALLS.append(("studio_image_saved", saved.path))


@hookimpl
def studio_model_loaded(api, model):
    CALLS.append(("studio_model_loaded", model.name, model.family))
