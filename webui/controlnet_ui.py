"""ControlNet units in the browser: N unit sub-tabs (``settings.controlnet_units``) for txt2img, img2img,
Inpaint and the ControlNet tab, with the A1111 extension's fields and a Preview of the detected map.

Everything reaches the engine through the Studio object (``studio.preprocessors``, ``studio.controlnets``);
``studio.controlnet`` imports torch, so it is imported inside functions only (by then the Studio has loaded it).
Element ids are ``<tab>_cn_<unit>_<part>`` (``txt2img_cn_0_module``...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from studio.errors import StudioError
from webui.common import error_html, note_html
from webui.icons import icon_button
from webui.model_lists import model_list, refresh_button

HIDDEN = dict(queue=False, api_visibility="private")
# what infotext restores (PNG Info / Send to), in this order
RESTORED = ("enabled", "module", "model", "weight", "guidance_start", "guidance_end", "control_mode", "resize_mode",
            "processor_res", "threshold_a", "threshold_b", "pixel_perfect")
UI_DEFAULTS = {"enabled": False, "use_init": False, "ready_map": False}   # the UI starts with units off


@dataclass
class UnitsUI:
    """The units of one tab. ``components`` are the event inputs (unit 0's ``parts``, unit 1's...), and
    ``to_units(*values)`` turns their values into the request's ``controlnet_units``."""

    studio: Any
    tab: str
    parts: tuple[str, ...]
    units: list[dict] = field(default_factory=list)     # per unit: {part: component, "preview", "note", ...}
    container: Any = None                               # the accordion (opened when units are restored)

    @property
    def components(self) -> list:
        return [u[p] for u in self.units for p in self.parts]

    @property
    def api_names(self) -> list[str]:
        return [f"controlnet_{i}_{p}" for i in range(len(self.units)) for p in self.parts]

    @property
    def api_defaults(self) -> dict:
        from studio.controlnet import ControlUnit
        base = {**vars(ControlUnit()), **UI_DEFAULTS}
        return {f"controlnet_{i}_{p}": base[p] for i in range(len(self.units)) for p in self.parts}

    def to_units(self, *values: Any) -> tuple:
        """The enabled units as ``ControlUnit``s (disabled ones are left out; each keeps its UI index, so an
        error names ``controlnet.units[<index>].<field>`` as shown in the tab)."""
        from studio.controlnet import ControlUnit

        n, out = len(self.parts), []
        for i in range(len(self.units)):
            v = dict(zip(self.parts, values[i * n:(i + 1) * n]))
            if not v.get("enabled"):
                continue
            module = "none" if v.get("ready_map") else (v.get("module") or "none")
            res, ta, tb = _unused_to_default(self.studio, module, v.get("processor_res"), v.get("threshold_a"),
                                             v.get("threshold_b"))
            data = {**{k: v[k] for k in RESTORED if k in v}, "module": module, "processor_res": res,
                    "threshold_a": ta, "threshold_b": tb, "mask": v.get("mask"),
                    # "use the img2img image": no image of its own, the engine falls back to the init image
                    "image": None if v.get("use_init") else v.get("image")}
            out.append(ControlUnit.from_api(data, index=i, preprocessors=self.studio.preprocessors))
        return tuple(out)

    @property
    def restore_outputs(self) -> list:
        return [u[p] for u in self.units for p in (*RESTORED, "ready_map")] + [self.container]

    def restore(self, text: str, *, reset: bool) -> tuple[list, list[str]]:
        """Updates for ``restore_outputs`` from an infotext's ``ControlNet N`` keys, and notes for the user.

        Without such keys: every unit is disabled when ``reset`` (PNG Info -> txt2img fills every field), else
        the units stay as they are."""
        from studio.controlnet import units_from_params
        from studio.infotext import parse_infotext

        keep = [gr.update() for _ in self.restore_outputs]
        notes: list[str] = []
        try:
            found = units_from_params(parse_infotext(text or "")) if (text or "").strip() else []
        except StudioError as exc:
            return keep, [f"ControlNet units not restored: {exc}"]
        if not found and not reset:
            return keep, []
        if len(found) > len(self.units):
            notes.append(f"The image used {len(found)} ControlNet units; this tab has {len(self.units)} "
                         "(Settings: ControlNet units per tab).")
        out: list = []
        for i in range(len(self.units)):
            unit = found[i] if i < len(found) else None
            out += self._unit_updates(unit, notes)
        opened = gr.Accordion(open=True) if found and isinstance(self.container, gr.Accordion) else gr.update()
        return out + [opened], notes

    def wire_preview(self, size: tuple[Any, Any] | None = None, init: Any = None) -> None:
        for unit in self.units:
            _wire_preview(self.studio, unit, size, init)

    def _unit_updates(self, unit: Any, notes: list[str]) -> list:
        if unit is None:
            return [False] + [gr.update() for _ in RESTORED[1:]] + [gr.update()]
        model = "None"
        try:
            info = self.studio.controlnets.find(unit.model)
            model = info.title if info is not None else "None"
        except StudioError:
            notes.append(f"ControlNet model {unit.model!r} is not in the ControlNet folder; pick one for unit "
                         f"{unit.index}.")
        try:   # an old alias ("hed") shows as today's name in the dropdown
            module = self.studio.preprocessors.get(unit.module).name
        except StudioError:
            notes.append(f"Preprocessor {unit.module!r} is not available; unit {unit.index} uses none.")
            module = "none"
        sliders = slider_updates(self.studio, module, unit.processor_res, unit.threshold_a, unit.threshold_b,
                                 unit.pixel_perfect)
        # module interactive and ready_map off: a restored unit always names its preprocessor
        # the choices too: the model may be newer than this page's list (a ControlNet just trained)
        model = gr.update(value=model, choices=["None", *self.studio.controlnets.titles()])
        return [True, gr.update(value=module, interactive=True), model, unit.weight, unit.guidance_start,
                unit.guidance_end, unit.control_mode, unit.resize_mode, *sliders, unit.pixel_perfect, False]


def controlnet_units_ui(studio: Any, tab: str, *, size: tuple[Any, Any] | None = None, init: Any = None,
                        init_label: str = "img2img", big: bool = False, wire_preview: bool = True) -> UnitsUI:
    """Lay out the units (an accordion, or open in a column when ``big``: the ControlNet tab).

    ``size``: the tab's width / height components (pixel-perfect preview); ``init``: the tab's init image
    component, which adds "use the <init_label> image" to each unit. ``wire_preview=False`` leaves the
    Preview buttons to a later ``ui.wire_preview(size)`` (when the size sliders come after the units)."""
    parts = ("enabled", "image", *(("use_init",) if init is not None else ()), "ready_map", "module", "model",
             "weight", "guidance_start", "guidance_end", "control_mode", "resize_mode", "processor_res",
             "threshold_a", "threshold_b", "pixel_perfect", "mask")
    ui = UnitsUI(studio, tab, parts)
    count = max(1, int(studio.settings.controlnet_units))
    box = (gr.Column(elem_id=f"{tab}_controlnet") if big
           else gr.Accordion("ControlNet", open=False, elem_id=f"{tab}_controlnet"))
    with box as ui.container:
        with gr.Tabs(elem_id=f"{tab}_cn_tabs"):
            for i in range(count):
                with gr.Tab(f"ControlNet Unit {i}", id=f"{tab}_cn_{i}"):
                    ui.units.append(_unit(studio, f"{tab}_cn_{i}", init is not None, init_label, big))
    for unit in ui.units:
        _wire(studio, unit)
    if wire_preview:
        ui.wire_preview(size, init)
    return ui


def _unit(studio: Any, prefix: str, with_init: bool, init_label: str, big: bool) -> dict:
    from studio.controlnet import CONTROL_MODES, RESIZE_MODES, ControlUnit

    d, u = ControlUnit(), {}
    height = 400 if big else 240
    with gr.Row(equal_height=True):
        u["image"] = gr.Image(label="Control image", type="pil", image_mode="RGB", format="png", height=height,
                              sources=["upload", "clipboard"], elem_id=f"{prefix}_image")
        u["preview"] = gr.Image(label="Detected map (Preview)", type="pil", format="png", interactive=False,
                                height=height, elem_id=f"{prefix}_preview")
    u["note"] = gr.HTML("", elem_id=f"{prefix}_note")
    with gr.Row():
        u["enabled"] = gr.Checkbox(False, label="Enable", elem_id=f"{prefix}_enabled", min_width=80)
        u["pixel_perfect"] = gr.Checkbox(False, label="Pixel perfect", elem_id=f"{prefix}_pixel_perfect",
                                         min_width=120)
        if with_init:
            u["use_init"] = gr.Checkbox(False, label=f"Use the {init_label} image", elem_id=f"{prefix}_use_init",
                                        min_width=160)
        u["ready_map"] = gr.Checkbox(False, label="Upload a ready map (preprocessor none)",
                                     elem_id=f"{prefix}_ready_map", min_width=200)
    with gr.Row(equal_height=False, elem_classes=["cn-tools"]):
        u["module"] = gr.Dropdown(module_choices(studio), value="none", label="Preprocessor",
                                  elem_id=f"{prefix}_module", scale=3, min_width=160)
        u["preview_button"] = icon_button("Preview", "preview", text=True, elem_id=f"{prefix}_preview_button",
                                          scale=0, min_width=110, size="md")
        # every unit's list (and every other model list) is refreshed by any refresh button: see webui.model_lists
        u["model"] = model_list(gr.Dropdown(model_choices(studio), value="None", label="Model",
                                            elem_id=f"{prefix}_model", scale=4, min_width=200), "controlnet")
        u["refresh"] = refresh_button(icon_button("Refresh", "refresh", elem_id=f"{prefix}_refresh",
                                                  elem_classes=["refresh-button"], scale=0, min_width=44))
    with gr.Row():
        u["weight"] = gr.Slider(0, 2, value=1, step=0.05, label="Control weight", elem_id=f"{prefix}_weight")
        u["guidance_start"] = gr.Slider(0, 1, value=0, step=0.01, label="Starting control step",
                                        elem_id=f"{prefix}_guidance_start")
        u["guidance_end"] = gr.Slider(0, 1, value=1, step=0.01, label="Ending control step",
                                      elem_id=f"{prefix}_guidance_end")
    with gr.Row():
        # "none" is the default module: no resolution and no thresholds until a preprocessor is picked
        u["processor_res"] = gr.Slider(64, 2048, value=512, step=8, label="Preprocessor resolution", visible=False,
                                       elem_id=f"{prefix}_processor_res")
        u["threshold_a"] = gr.Slider(-1, 255, value=-1, step=1, label="Threshold A", visible=False,
                                     elem_id=f"{prefix}_threshold_a")
        u["threshold_b"] = gr.Slider(-1, 255, value=-1, step=1, label="Threshold B", visible=False,
                                     elem_id=f"{prefix}_threshold_b")
    u["control_mode"] = gr.Radio(list(CONTROL_MODES), value=d.control_mode, label="Control mode",
                                 elem_id=f"{prefix}_control_mode")
    u["resize_mode"] = gr.Radio(list(RESIZE_MODES), value=d.resize_mode, label="Resize mode",
                                elem_id=f"{prefix}_resize_mode")
    with gr.Accordion("Mask (optional): where this unit acts, white = full effect", open=False,
                      elem_id=f"{prefix}_mask_box"):
        u["mask"] = gr.Image(label="Unit mask", type="pil", image_mode="L", format="png", height=200,
                             sources=["upload", "clipboard"], elem_id=f"{prefix}_mask")
    return u


def _wire(studio: Any, u: dict) -> None:
    sliders = [u["processor_res"], u["threshold_a"], u["threshold_b"]]
    # a dropped image is meant to be used: enable the unit (as the extension does)
    u["image"].upload(lambda: True, None, u["enabled"], **HIDDEN)
    if "use_init" in u:   # so does choosing the tab's own image
        u["use_init"].input(lambda use: True if use else gr.update(), u["use_init"], u["enabled"], **HIDDEN)
    u["module"].input(lambda m, model, pp: [*slider_updates(studio, m, pixel_perfect=pp),
                                            _model_for(studio, m, model)],
                      [u["module"], u["model"], u["pixel_perfect"]], [*sliders, u["model"]], **HIDDEN)
    u["pixel_perfect"].input(lambda pp, m: gr.update(visible=_has_resolution(studio, m) and not pp),
                             [u["pixel_perfect"], u["module"]], u["processor_res"], **HIDDEN)
    u["ready_map"].input(lambda ready, m: [gr.update(value="none" if ready else m, interactive=not ready),
                                           *slider_updates(studio, "none" if ready else m)],
                         [u["ready_map"], u["module"]], [u["module"], *sliders], **HIDDEN)


def _wire_preview(studio: Any, u: dict, size: tuple[Any, Any] | None, init: Any) -> None:
    sliders = [u["processor_res"], u["threshold_a"], u["threshold_b"]]
    # tabs without an init image or size still call preview() with the same arguments
    extra = [init if init is not None else gr.State(None),
             u["use_init"] if "use_init" in u else gr.State(False), *(size or (gr.State(512), gr.State(512)))]
    u["preview_button"].click(
        lambda *v: preview(studio, *v),
        [u["image"], u["ready_map"], u["module"], *sliders, u["pixel_perfect"], u["resize_mode"], *extra],
        [u["preview"], u["note"]], api_visibility="private", show_progress="minimal",
        # CPU preprocessing, not device work: its own small pool, never behind (or blocking) the "gpu" queue
        concurrency_id="controlnet_preview", concurrency_limit=2)


# ---- choices and slider updates --------------------------------------------------------------------------

def module_choices(studio: Any) -> list[tuple[str, str]]:
    reg = studio.preprocessors
    return [(reg.get(name).label, name) for name in reg.names()]


def model_choices(studio: Any) -> list[str]:
    return ["None", *studio.controlnets.titles()]


def _has_resolution(studio: Any, module: str) -> bool:
    try:
        return studio.preprocessors.get(module or "none").resolution is not None
    except StudioError:
        return False


def slider_updates(studio: Any, module: str, res: Any = None, a: Any = None, b: Any = None,
                   pixel_perfect: bool = False) -> list:
    """Resolution / threshold A / threshold B for a preprocessor: label, range and default from its spec
    (``module_detail``); hidden when it has no such parameter. Given values (not -1) are kept."""
    try:
        item = studio.preprocessors.get(module or "none")
    except StudioError:
        return [gr.update(visible=False)] * 3
    kept = lambda v, d: d if v is None or v == -1 else v  # noqa: E731
    out = [gr.update(visible=item.resolution is not None and not pixel_perfect,
                     value=kept(res, item.resolution or 512))]
    for i, value in enumerate((a, b)):
        if i < len(item.params):
            p = item.params[i]
            out.append(gr.update(visible=True, label=p.label, minimum=p.min, maximum=p.max, step=p.step,
                                 value=kept(value, p.default)))
        else:
            out.append(gr.update(visible=False, value=-1))
    return out


def _unused_to_default(studio: Any, module: str, res: Any, a: Any, b: Any) -> tuple:
    """-1 (the preprocessor's default) for sliders the preprocessor does not have, so the infotext stays clean."""
    try:
        item = studio.preprocessors.get(module)
    except StudioError:
        return res, a, b   # from_api names the unknown module
    res = int(res) if item.resolution is not None and res is not None else -1
    n = len(item.params)
    return res, (a if n > 0 else -1), (b if n > 1 else -1)


def _model_for(studio: Any, module: str, current: str) -> Any:
    """With no model chosen yet, pick the first whose name mentions the preprocessor's family (canny ->
    control_..._canny), as the extension's control types do; a chosen model is never changed."""
    if current not in (None, "", "None") or not module or module == "none":
        return gr.update()
    family = module.split("_")[0].lower()
    match = next((t for t in studio.controlnets.titles() if family in t.lower()), None)
    return match or gr.update()


# ---- preview ---------------------------------------------------------------------------------------------

def preview(studio: Any, image: Any, ready_map: bool, module: str, res: Any, a: Any, b: Any, pixel_perfect: bool,
            resize_mode: str, init: Any, use_init: bool, width: Any, height: Any) -> tuple:
    """Run the unit's preprocessor on its image (or the tab's init image) and show the detected map."""
    from studio.controlnet import RESIZE_MODES, pixel_perfect_resolution

    source = _background(init) if use_init else image
    if source is None:
        where = "the tab's image box" if use_init else "the unit's Control image"
        return None, error_html(f"Nothing to preview: drop an image into {where} first.")
    module = "none" if ready_map else (module or "none")
    source = source.convert("RGB")
    try:
        res, a, b = _unused_to_default(studio, module, res, a, b)
        if pixel_perfect:
            mode = RESIZE_MODES.index(resize_mode) if resize_mode in RESIZE_MODES else 1
            res = pixel_perfect_resolution(source.size, int(width or 512), int(height or 512), mode)
        detected = studio.preprocessors.run(module, source, res, threshold_a=a, threshold_b=b)
    except StudioError as exc:
        gr.Warning(str(exc))
        return None, error_html(str(exc))
    return detected, note_html(f"{module}: {detected.width}×{detected.height}")


def _background(value: Any) -> Any:
    """An image component's value, or an image editor's uploaded background."""
    return value.get("background") if isinstance(value, dict) else value
