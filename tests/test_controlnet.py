"""ControlNet: offline loading, units, preprocessors, and its effect inside the diffusers pipelines."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from studio.controlnet import (ControlNetLibrary, ControlUnit, ParamSpec, Preprocessors, check_family,
                               controlnet_family, default_preprocessors, infotext_params, load_controlnet, peek_family,
                               pixel_perfect_resolution, prepare_control_image, units_from_params)
from studio.controlnet.apply import build_plan, controlnet_pipeline, make_controlnet_set, soft_scales
from studio.errors import ModelLoadError, StudioError
from tests import controlnets, tinymodels


@pytest.fixture(scope="module")
def tiny():
    comps = tinymodels.make_tiny("sd1", seed=0)
    return comps, controlnets.make_controlnet(comps.unet, seed=0), controlnets.make_controlnet(comps.unet, seed=1)


@pytest.fixture(scope="module")
def base_pipe(tiny):
    return tinymodels.make_pipeline(tiny[0])


def rect_image(size=64, box=(16, 16, 47, 47)) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).rectangle(box, fill="black")
    return img


def run(pipe, steps=2, callback=None, **kw):
    g = torch.Generator().manual_seed(7)
    extra = {"callback_on_step_end": callback} if callback else {}
    return pipe(prompt="a red cube", num_inference_steps=steps, height=64, width=64, generator=g, guidance_scale=6.0,
                output_type="np", **extra, **kw).images[0]


def b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ---- models --------------------------------------------------------------------------------------

def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_loads_offline_bit_exact_from_folder_and_single_files(tiny, settings):
    _, cn, _ = tiny
    root = settings.controlnet_path
    root.mkdir(parents=True, exist_ok=True)
    paths = [controlnets.write_diffusers(cn, root / "tiny-diffusers"),
             controlnets.write_ldm(cn, root / "control_tiny_canny.safetensors"),
             controlnets.write_ldm(cn, root / "control_tiny_plain.pth", prefix="")]
    for p in paths:
        model, family = load_controlnet(p)
        assert family == "sd1" and _same(model, cn), p
    lib = ControlNetLibrary(settings)
    from studio.hashes import legacy_model_hash
    info = lib.find("control_tiny_canny")
    assert info.title == f"control_tiny_canny [{legacy_model_hash(info.path)}]"
    assert lib.find(info.title) is info and lib.find("control_tiny_canny [00000000]") is info  # stale hash: by name
    assert lib.find("None") is None
    assert sorted(lib.titles())[-1].startswith("tiny-diffusers [")
    assert lib.probe_family(info) == "sd1" and lib.probe_family(lib.find("tiny-diffusers")) == "sd1"
    with pytest.raises(StudioError, match="not found.*control_tiny_canny"):
        lib.find("control_missing")


def test_family_read_from_header_for_sd2_and_sdxl(tmp_path):
    for fam in ("sd2", "sdxl"):
        cn = controlnets.make_controlnet(tinymodels.make_tiny(fam, seed=3).unet)
        path = controlnets.write_ldm(cn, tmp_path / f"{fam}.safetensors")
        assert peek_family(path) == fam
        if fam == "sdxl":
            model, family = load_controlnet(path, addition_time_embed_dim=cn.config.addition_time_embed_dim)
            assert family == "sdxl" and _same(model, cn)


def test_bad_and_unsupported_files_get_clear_messages(tiny, tmp_path):
    from safetensors.torch import save_file
    _, cn, _ = tiny
    good = controlnets.write_ldm(cn, tmp_path / "full.safetensors")
    from safetensors.torch import load_file
    sd = load_file(good)
    sd.pop("control_model.zero_convs.1.0.weight")
    save_file(sd, tmp_path / "damaged.safetensors")
    with pytest.raises(ModelLoadError, match=r"damaged\.safetensors.*missing.*zero_convs\.1\.0\.weight"):
        load_controlnet(tmp_path / "damaged.safetensors")
    t = torch.zeros(2, 2)
    save_file({"lora_controlnet": torch.zeros(1), "input_blocks.1.0.in_layers.2.up": t}, tmp_path / "cl.safetensors")
    with pytest.raises(ModelLoadError, match="ControlNet-LoRA.*not supported yet"):
        load_controlnet(tmp_path / "cl.safetensors")
    save_file({"body.0.block1.weight": t, "conv_in.weight": t.clone()}, tmp_path / "t2i.safetensors")
    with pytest.raises(ModelLoadError, match="T2I-Adapter.*not supported yet"):
        load_controlnet(tmp_path / "t2i.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": t.clone()}, tmp_path / "ckpt.safetensors")
    with pytest.raises(ModelLoadError, match="Stable-diffusion"):
        load_controlnet(tmp_path / "ckpt.safetensors")


def test_family_mismatch_names_both_models():
    check_family("sd1", "sd1")
    with pytest.raises(StudioError, match=r"control_xl \[1234abcd\] is for SDXL but checkpoint tiny-sd1 is SD 1.x"):
        check_family("sdxl", "sd1", ("control_xl [1234abcd]", "tiny-sd1"))


# ---- running -------------------------------------------------------------------------------------

def _plan(units, nets, images=None, mode="txt2img"):
    images = images or [rect_image()] * len(units)
    return build_plan([u.validate() for u in units], nets, images, width=64, height=64, guidance_scale=6.0)


def test_weight_zero_equals_no_controlnet(tiny, base_pipe):
    _, cn, _ = tiny
    plain = run(base_pipe)
    plan = _plan([ControlUnit(weight=0)], [cn])
    pipe = controlnet_pipeline("txt2img", "sd1", base_pipe.components, plan.controlnet)
    assert pipe.unet is base_pipe.unet and pipe.vae is base_pipe.vae  # a view, not a copy
    np.testing.assert_array_equal(run(pipe, **plan.call_kwargs("txt2img")), plain)
    assert plan.controlnet.ran == [0]
    plan = _plan([ControlUnit(weight=1)], [cn])
    pipe = controlnet_pipeline("txt2img", "sd1", base_pipe.components, plan.controlnet)
    assert np.abs(run(pipe, **plan.call_kwargs("txt2img")) - plain).max() > 1e-3


def test_guidance_range_limits_the_steps_it_acts_on(tiny, base_pipe):
    _, cn, _ = tiny
    seen_steps: list[int] = []
    acted_at: list[int] = []

    def on_step_end(pipe, step, timestep, kwargs):
        seen_steps.append(step)
        return kwargs

    handle = cn.register_forward_hook(lambda *a: acted_at.append(len(seen_steps)))
    try:
        for start, end, expect in ((0.5, 1.0, [2, 3]), (0.0, 0.5, [0, 1])):
            seen_steps.clear(), acted_at.clear()
            plan = _plan([ControlUnit(guidance_start=start, guidance_end=end)], [cn])
            pipe = controlnet_pipeline("txt2img", "sd1", base_pipe.components, plan.controlnet)
            run(pipe, steps=4, callback=on_step_end, **plan.call_kwargs("txt2img"))
            assert acted_at == expect
    finally:
        handle.remove()


def test_two_units_add_their_residuals(tiny, base_pipe):
    _, cn_a, cn_b = tiny
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    cond = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(500)
    with torch.no_grad():
        da, ma = cn_a(x, t, ehs, cond, conditioning_scale=0.7, return_dict=False)
        db, mb = cn_b(x, t, ehs, cond, conditioning_scale=1.3, return_dict=False)
        both = make_controlnet_set([cn_a, cn_b])(x, t, ehs, [cond, cond], [0.7, 1.3])
    for got, a, b in zip(both[0] + [both[1]], list(da) + [ma], list(db) + [mb]):
        torch.testing.assert_close(got, a + b)
    plan = _plan([ControlUnit(weight=0.7), ControlUnit(weight=1.3, module="invert")], [cn_a, cn_b])
    pipe = controlnet_pipeline("txt2img", "sd1", base_pipe.components, plan.controlnet)
    run(pipe, **plan.call_kwargs("txt2img"))
    assert plan.controlnet.ran == [2, 2]


def test_control_modes_and_masks_shape_the_residuals(tiny):
    _, cn, _ = tiny
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    cond = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(300)

    def residuals(mode="Balanced", mask=None):
        with torch.no_grad():
            d, m = make_controlnet_set([cn], [mode], [mask])(x, t, ehs, [cond], [1.0])
        return list(d) + [m]

    plain, prompt, control = residuals(), residuals("My prompt is more important"), \
        residuals("ControlNet is more important")
    for r_plain, r_soft, k in zip(plain, prompt, soft_scales(len(plain))):
        torch.testing.assert_close(r_soft, r_plain * k)
    assert soft_scales(13)[0] == pytest.approx(0.825 ** 12) and soft_scales(13)[-1] == 1.0
    for r in control:  # the unconditional half gets no control
        assert torch.count_nonzero(r[0]) == 0 and torch.count_nonzero(r[1]) > 0
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, :32] = 1.0   # left half
    for r in residuals(mask=mask)[:2]:
        assert torch.count_nonzero(r[..., r.shape[-1] // 2 + 1:]) == 0 and torch.count_nonzero(r) > 0


def test_img2img_and_inpaint_pipelines_take_control_image(tiny, base_pipe):
    _, cn, _ = tiny
    plan = _plan([ControlUnit(control_mode=2)], [cn])
    for mode, extra in (("img2img", {}), ("inpaint", {"mask_image": Image.new("L", (64, 64), 255)})):
        pipe = controlnet_pipeline(mode, "sd1", base_pipe.components, plan.controlnet)
        out = run(pipe, steps=3, image=rect_image(), strength=0.7, **extra, **plan.call_kwargs(mode))
        assert out.shape == (64, 64, 3) and np.isfinite(out).all()


# ---- preprocessors -------------------------------------------------------------------------------

@pytest.fixture()
def preps(tmp_path):
    return default_preprocessors(tmp_path / "annotators")


def test_model_free_maps_on_a_rectangle(preps):
    img = rect_image()
    edges = np.asarray(preps.run("canny", img, 64))[:, :, 0]
    ys, xs = np.nonzero(edges)
    assert ys.size and 14 <= ys.min() <= 17 and 46 <= ys.max() <= 49 and 14 <= xs.min() <= 17 and 46 <= xs.max() <= 49
    assert edges[30:34, 30:34].max() == 0 and edges[:8].max() == 0  # nothing inside or far outside
    lines = np.asarray(preps.run("lineart_standard", img, 64))[:, :, 0]
    assert lines[16:20, 20:44].mean() > 100 and lines[30:34, 30:34].max() < 40 and lines[:6, :6].max() == 0
    inv = np.asarray(preps.run("invert", img, 64))
    assert (inv[32, 32] == 255).all() and (inv[2, 2] == 0).all()
    shuffled = np.asarray(preps.run("shuffle", img, 64))
    assert shuffled.shape == (64, 64, 3) and not np.array_equal(shuffled, np.asarray(img))
    assert 0.1 < (shuffled[:, :, 0] < 128).mean() < 0.5          # the same content, moved around
    np.testing.assert_array_equal(shuffled, np.asarray(default_preprocessors().run("shuffle", img, 64)))
    assert preps.run("tile_resample", img, threshold_a=2).size == (32, 32)
    assert preps.run("none", img).size == (64, 64)
    assert preps.run("canny", Image.new("RGB", (256, 128)), 64).size == (128, 64)  # short side = resolution


def test_module_detail_has_the_extension_shape(preps):
    detail = preps.module_detail()
    assert detail["canny"] == {"model_free": True, "sliders": [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1.0},
        {"name": "Canny High Threshold", "value": 200, "min": 1, "max": 255, "step": 1.0}]}
    assert detail["none"] == {"model_free": True, "sliders": []}
    assert preps.get("hed").name == "softedge_hed" and "hed" not in detail  # old names still accepted
    assert detail["softedge_hed"]["model_free"] is False
    for name in ("openpose_full", "depth_midas", "lineart_anime", "mlsd", "normal_bae", "mediapipe_face"):
        assert name in preps.names()


def test_result_cache_runs_each_preprocessor_once(preps):
    unit = ControlUnit(module="canny", image=rect_image(96), processor_res=64).validate(preps)
    first = prepare_control_image(unit, 64, 64, preps)
    second = prepare_control_image(unit, 64, 64, preps)
    assert preps.runs["canny"] == 1 and preps.cache_hits == 1
    assert first.image.tobytes() == second.image.tobytes() and first.image.size == (64, 64)
    prepare_control_image(ControlUnit(module="canny", image=rect_image(96), processor_res=64, threshold_a=50)
                          .validate(preps), 64, 64, preps)
    assert preps.runs["canny"] == 2  # other parameters, another run


def test_registered_weighted_preprocessor_loads_local_weights_once(tmp_path):
    root = tmp_path / "annotators"
    root.mkdir()
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 1, 3, padding=1)
    torch.save(net.state_dict(), root / "tiny_edge.pth")

    def load(files):
        m = torch.nn.Conv2d(3, 1, 3, padding=1)
        m.load_state_dict(torch.load(files["tiny_edge.pth"], weights_only=True))
        return m.eval()

    def detect(image, resolution, params, model):
        x = torch.from_numpy(np.asarray(image.resize((resolution, resolution)), dtype=np.float32) / 255)
        with torch.no_grad():
            y = model(x.permute(2, 0, 1)[None])[0, 0].abs() * params["gain"]
        return (y.clamp(0, 1) * 255).byte().numpy()

    reg = Preprocessors(root)
    reg.register("tiny_edge", detect, [ParamSpec("gain", "Gain", 0, 10, 2)], needs_weights=["tiny_edge.pth"],
                 loader=load)
    out = reg.run("tiny_edge", rect_image(), 64)
    assert out.size == (64, 64) and np.asarray(out).max() > 0
    reg.run("tiny_edge", rect_image(48), 64)
    assert reg.model_loads == 1 and reg.runs["tiny_edge"] == 2
    with pytest.raises(ValueError):
        reg.register("tiny_edge", detect)


def test_builtin_pidinet_runs_with_random_local_weights(tmp_path):
    from controlnet_aux.pidi.model import pidinet
    root = tmp_path / "annotators"
    root.mkdir()
    torch.manual_seed(0)
    torch.save({"state_dict": {"module." + k: v for k, v in pidinet().state_dict().items()}},
               root / "table5_pidinet.pth")
    reg = default_preprocessors(root)
    out = reg.run("softedge_pidinet", rect_image(), 64)
    assert out.mode == "RGB" and min(out.size) == 64 and reg.model_loads == 1


def test_missing_annotator_weights_name_the_file(preps, tmp_path):
    with pytest.raises(StudioError) as err:
        preps.run("softedge_hed", rect_image(), 64)
    text = str(err.value)
    assert str(tmp_path / "annotators" / "ControlNetHED.pth") in text and "lllyasviel/Annotators" in text
    with pytest.raises(StudioError, match="mediapipe"):
        preps.run("mediapipe_face", rect_image(), 64)
    assert preps.run("canny", rect_image(), 64)  # the others still run


# ---- units ---------------------------------------------------------------------------------------

def test_unit_from_api_accepts_strings_and_ints(preps):
    img = rect_image()
    u = ControlUnit.from_api({"enabled": True, "module": "canny", "model": "control_tiny [abcd1234]",
                              "weight": "0.5", "image": b64(img), "mask": b64(Image.new("L", (64, 64), 255)),
                              "resize_mode": 2, "control_mode": "ControlNet is more important",
                              "processor_res": 256, "threshold_a": 50, "threshold_b": 150, "pixel_perfect": "true",
                              "guidance_start": 0.1, "guidance_end": 0.9, "unknown_field": 1}, 0, preps)
    assert (u.resize_mode, u.control_mode, u.weight, u.pixel_perfect) == \
        ("Resize and Fill", "ControlNet is more important", 0.5, True)
    assert u.image.size == (64, 64) and u.mask.mode == "L"
    u = ControlUnit.from_api({"resize_mode": "Inner Fit (Scale to Fit)", "control_mode": 1, "input_image": b64(img),
                              "threshold_a": None})
    assert u.resize_mode == "Crop and Resize" and u.control_mode == "My prompt is more important" and u.image
    for bad, field in (({"resize_mode": "Stretch"}, "resize_mode"), ({"control_mode": 7}, "control_mode"),
                       ({"weight": 3}, "weight"), ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance_start"),
                       ({"module": "nope"}, "module"), ({"image": "not-an-image"}, "image")):
        with pytest.raises(StudioError) as err:
            ControlUnit.from_api(bad, 1, preps)
        assert err.value.field == f"controlnet.units[1].{field}"


def test_infotext_round_trip():
    unit = ControlUnit(module="canny", model="control_x [abcd1234]", weight=1.0, threshold_a=100, threshold_b=200,
                       resize_mode=1).validate()
    text = unit.infotext()
    assert text == ("Module: canny, Model: control_x [abcd1234], Weight: 1, Resize Mode: Crop and Resize, "
                    "Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 1, "
                    "Pixel Perfect: False, Control Mode: Balanced")
    back = ControlUnit.parse_infotext(text)
    assert back == unit
    other = ControlUnit(module="none", weight=0.65, guidance_end=0.8, control_mode=2, pixel_perfect=True).validate()
    params = infotext_params([unit, ControlUnit(enabled=False), other])
    assert list(params) == ["ControlNet 0", "ControlNet 2"] and "Threshold A" not in params["ControlNet 2"]
    assert units_from_params(params) == [unit, other]
    legacy = ('"Module: canny, Model: control_x [abcd1234], Weight: 1, Resize Mode: Crop and Resize, Low Vram: '
              'False, Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 1, '
              'Pixel Perfect: False, Control Mode: Balanced, Hr Option: Both, Save Detected Map: True"')
    assert ControlUnit.parse_infotext(legacy) == unit


def test_pixel_perfect_and_resize_modes(preps):
    assert pixel_perfect_resolution((1024, 512), 512, 512, 1) == 512   # cover: scale by the larger factor
    assert pixel_perfect_resolution((1024, 512), 512, 512, 2) == 256   # fit inside
    wide = Image.new("RGB", (128, 64), "white")
    ImageDraw.Draw(wide).rectangle((0, 0, 31, 63), fill="black")
    for mode, expect_black in ((0, True), (1, False)):
        u = ControlUnit(module="none", image=wide, resize_mode=mode).validate(preps)
        out = np.asarray(prepare_control_image(u, 64, 64, preps).image)
        assert out.shape == (64, 64, 3) and (out[32, 4].max() < 60) == expect_black  # crop drops the left band
    u = ControlUnit(module="canny", pixel_perfect=True).validate(preps)
    assert prepare_control_image(u, 64, 64, preps, fallback_image=wide).resolution == 64
    with pytest.raises(StudioError, match="no input image") as err:
        prepare_control_image(ControlUnit(index=2).validate(), 64, 64, preps)
    assert err.value.field == "controlnet.units[2].image"


# ---- the integration recipe (what the engine does) ------------------------------------------------

def _generate_with_units(studio, lib, preps, unit_dicts, comps):
    """The engine's recipe: resolve models, cache them in the manager, preprocess (cached), plan, pipe view."""
    import contextlib
    units = [ControlUnit.from_api(d, i, preps) for i, d in enumerate(unit_dicts)]
    units = [u for u in units if u.enabled]
    with contextlib.ExitStack() as stack:
        nets = []
        for u in units:
            info = lib.find(u.model, field=u.f("model"))
            net = stack.enter_context(studio.manager.acquire_module(
                lib.key(info), f"ControlNet {info.title}",
                lambda info=info: load_controlnet(info.path, dtype=studio.manager.dtype)[0]))
            check_family(controlnet_family(net), comps.family, (info.title, "tiny-sd1"), field=u.f("model"))
            u.model = info.title  # the infotext names the model by its title
            nets.append(net)
        prepared = [prepare_control_image(u, 64, 64, preps) for u in units]
        plan = build_plan(units, nets, [p.image for p in prepared], width=64, height=64, guidance_scale=6.0)
        pipe = controlnet_pipeline("txt2img", comps.family, tinymodels.make_pipeline(comps).components,
                                   plan.controlnet)
        return run(pipe, **plan.call_kwargs("txt2img")), infotext_params(plan.units)


def test_second_generation_loads_nothing_and_preprocesses_nothing(studio, tiny, tmp_path):
    comps, cn_a, cn_b = tiny
    root = studio.settings.controlnet_path
    root.mkdir(parents=True, exist_ok=True)
    controlnets.write_ldm(cn_a, root / "control_a.safetensors")
    controlnets.write_diffusers(cn_b, root / "control_b")
    lib = ControlNetLibrary(studio.settings, studio.hashes)
    preps = default_preprocessors(studio.settings.annotators_path)
    units = [{"module": "canny", "model": "control_a", "image": b64(rect_image()), "weight": 0.8},
             {"module": "invert", "model": "control_b", "image": b64(rect_image()), "guidance_end": 0.5},
             {"enabled": False, "model": "missing-model"}]
    loads = studio.manager.loads
    first, info = _generate_with_units(studio, lib, preps, units, comps)
    assert studio.manager.loads == loads + 2 and dict(preps.runs) == {"canny": 1, "invert": 1}
    second, _ = _generate_with_units(studio, lib, preps, units, comps)
    assert studio.manager.loads == loads + 2 and dict(preps.runs) == {"canny": 1, "invert": 1}
    np.testing.assert_array_equal(first, second)
    assert info["ControlNet 0"].startswith(f"Module: canny, Model: {lib.find('control_a').title}, Weight: 0.8")
    with pytest.raises(StudioError, match="control_a.*is for SDXL but checkpoint tiny-sd1") as err:
        check_family("sdxl", "sd1", (lib.find("control_a").title, "tiny-sd1"), field="controlnet.units[0].model")
    assert err.value.field == "controlnet.units[0].model"


def test_unit_masks_are_built_once_per_device_dtype_and_size(tiny):
    """The mask is resized / moved once per residual size, not per residual per step; results are unchanged."""
    import torch.nn.functional as F

    _, cn, _ = tiny
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    cond = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, :32] = 1.0
    cset = make_controlnet_set([cn], ["Balanced"], [mask])
    with torch.no_grad():
        first = cset(x, torch.tensor(300), ehs, [cond], [1.0])
        builds = cset.mask_builds
        cached = dict(cset._mask_cache)
        second = cset(x, torch.tensor(200), ehs, [cond], [1.0])   # the next step
        plain_d, plain_m = make_controlnet_set([cn], ["Balanced"], [None])(x, torch.tensor(300), ehs, [cond], [1.0])
    sizes = {tuple(r.shape[-2:]) for r in list(first[0]) + [first[1]]}
    assert builds == len(sizes) < len(first[0]) + 1            # one per size (several residuals share a size)
    assert cset.mask_builds == builds                           # the second step built nothing
    assert all(cset._mask_cache[k] is v for k, v in cached.items())
    for got, plain in zip(list(first[0]) + [first[1]], list(plain_d) + [plain_m]):
        want = plain * F.interpolate(mask, size=plain.shape[-2:], mode="bilinear", align_corners=False)
        torch.testing.assert_close(got, want)
    assert second[1].shape == first[1].shape
    assert cset._mask_for(0, first[1].half()).dtype == torch.float16     # another dtype is another entry
    assert cset.mask_builds == builds + 1


class _DeviceModel:
    def __init__(self, fail=False):
        self.moves, self.fail = [], fail

    def to(self, device):
        self.moves.append(str(device))
        if self.fail and str(device) != "cpu":
            raise RuntimeError("CUDA out of memory")
        return self


def test_annotator_models_move_to_the_compute_device(tmp_path, caplog):
    models = []

    def loader(files):
        models.append(_DeviceModel(fail=len(models) == 1))
        return models[-1]

    def detect(image, resolution, params, model):
        return image

    for device, want in (("cuda", ["cuda"]), ("cpu", []), (None, [])):
        reg = Preprocessors(tmp_path, device=(lambda d=device: d) if device else None)
        reg.register("fake", detect, loader=loader)
        reg.run("fake", rect_image(), 64)
        assert models[-1].moves == want, device
        if device == "cuda":   # the next load fails to move: it stays on the CPU with a warning, and works
            reg.clear()
            reg.run("fake", rect_image(), 64)
            assert models[-1].moves == ["cuda", "cpu"] and "stays on the CPU" in caplog.text


def test_studio_runs_annotators_where_the_settings_say(studio):
    assert studio.preprocessors._device() == studio.manager.device
    studio.settings = studio.settings.replace(annotator_device="cpu")
    assert studio.preprocessors._device() == "cpu"
    with pytest.raises(StudioError, match="annotator_device"):
        studio.settings.replace(annotator_device="gpu")
