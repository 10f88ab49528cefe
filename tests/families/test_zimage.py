"""Z-Image as ComfyUI publishes it (the transformer alone + qwen_3_4b + the FLUX ae) and as a diffusers folder:
detected, loaded exactly, and drawing diffusers' own pixels through the studio's one generation path."""
from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from studio import families
from studio.errors import ModelLoadError
from studio.loading.single_file import load_single_file
from studio.loading.state_dict import read_header_shapes
from studio.request import GenerationRequest

CKPT = "z_image_turbo_tiny.safetensors"
BASE = dict(prompt="a red circle on a blue square", negative_prompt="", width=64, height=64, steps=3,
            cfg_scale=1.0, sampler_name="Euler", scheduler="Automatic", seed=7)


def req(**kw) -> GenerationRequest:
    return GenerationRequest(**{**BASE, **kw})


def px(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A ComfyUI-style models/ tree: the transformer in Stable-diffusion/, qwen_3_4b in text_encoders/, ae in
    VAE/; beside it an all-in-one file and a diffusers folder of the same model."""
    from tests.tinyzimage import (make_tiny_zimage, write_zimage_companions, write_zimage_folder,
                                  write_zimage_single_file)
    root = tmp_path_factory.mktemp("zimage-store")
    models = root / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    a, b = make_tiny_zimage(seed=1), make_tiny_zimage(seed=2)
    write_zimage_single_file(a, models / "Stable-diffusion" / CKPT)
    write_zimage_single_file(b, models / "Stable-diffusion" / "z_image_other_tiny.safetensors")
    write_zimage_companions(a, models / "text_encoders", models / "VAE")
    return {"models": models, "ref": a, "aio": write_zimage_single_file(a, root / "z_image_aio.safetensors",
                                                                        all_in_one=True),
            "folder": write_zimage_folder(a, root / "Z-Image-Turbo-tiny")}


@pytest.fixture()
def studio(store, tmp_path):
    from studio.app import Studio
    from studio.settings import Settings
    shutil.copytree(store["models"], tmp_path / "models")
    s = Studio(Settings(models_dir=str(tmp_path / "models"), data_dir=str(tmp_path / "data"),
                        outdir=str(tmp_path / "out"), default_checkpoint=CKPT, preview_every=1))
    yield s
    s.close()


def _companions(models):
    from studio.loading import companions
    return companions.find([models / "text_encoders", models / "VAE"])


# ---- detection and loading -----------------------------------------------------------------------------------
def test_the_header_says_zimage_not_flux_or_sd3(store):
    from tests.tinyflux import flux_state_dict, make_tiny_flux
    for path in (str(store["models"] / "Stable-diffusion" / CKPT), store["aio"]):
        shapes = read_header_shapes(path)
        assert families.detect_ldm(shapes, path).name == "zimage"
        assert families.get("flux").ldm_score(shapes) == 0 and families.get("sd3").ldm_score(shapes) == 0
    flux = {k: tuple(v.shape) for k, v in flux_state_dict(make_tiny_flux(seed=3)).items()}
    assert families.get("zimage").ldm_score(flux) == 0 and families.detect_ldm(flux).name == "flux"


def test_companion_files_are_told_by_their_headers(store):
    kinds = {c.path.name: (c.kind, c.width) for c in _companions(store["models"])}
    assert kinds == {"qwen_3_4b.safetensors": ("qwen3", 64), "ae.safetensors": ("vae16", 0)}


def test_all_in_one_file_loads_every_part_exactly(store):
    c = load_single_file(store["aio"])
    assert c.family == "zimage" and c.spec.label == "Z-Image" and c.in_channels == 16
    for part in ("unet", "vae", "text_encoder"):
        assert _equal(getattr(c, part), getattr(store["ref"], part)), part
    assert list(c.unet.config.axes_dims) == [32, 48, 48] and list(c.unet.config.axes_lens) == [1536, 512, 512]
    assert c.vae.config.scaling_factor == 0.3611 and c.vae.config.shift_factor == 0.1159
    assert c.scheduler_config == {"num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 3.0}


def test_transformer_only_file_takes_its_parts_from_companion_files(store):
    c = load_single_file(store["models"] / "Stable-diffusion" / CKPT, companions=lambda: _companions(store["models"]))
    for part in ("unet", "vae", "text_encoder"):
        assert _equal(getattr(c, part), getattr(store["ref"], part)), part
    notes = " ".join(c.notes)
    assert "qwen3 from qwen_3_4b.safetensors" in notes and "vae16 from ae.safetensors" in notes


def test_a_missing_companion_file_is_named_with_where_it_goes(store, tmp_path):
    path = store["models"] / "Stable-diffusion" / CKPT
    with pytest.raises(ModelLoadError, match=r"transformer only; the Qwen3 text encoder \(64 wide\) and the VAE "
                                             r"are not in it") as e:
        load_single_file(path, companions=[])
    assert "qwen_3_4b.safetensors in models/text_encoder" in e.value.fix and "ae.safetensors in models/VAE" in \
        e.value.fix
    only_vae = [c for c in _companions(store["models"]) if c.kind == "vae16"]
    with pytest.raises(ModelLoadError, match=r"the Qwen3 text encoder \(64 wide\) is not in it") as e:
        load_single_file(path, companions=only_vae)
    assert "ae.safetensors" not in e.value.fix


def test_folder_loads_as_zimage_with_its_own_tokenizer(store):
    from studio.loading.diffusers_folder import load_diffusers_folder
    c = load_diffusers_folder(store["folder"])
    assert c.family == "zimage" and not any("shipped Qwen3 tokenizer" in n for n in c.notes)
    for part in ("unet", "vae", "text_encoder"):
        assert _equal(getattr(c, part), getattr(store["ref"], part)), part
    assert c.tokenizer("Hey how are you doing").input_ids == [18665, 1246, 525, 498, 3730]
    assert c.scheduler_config["shift"] == 3.0


def test_single_file_draws_the_pixels_of_diffusers_pipeline_from_the_folder(store):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    ref = ZImagePipeline.from_pretrained(store["folder"], local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    c = load_single_file(store["aio"])
    ours = c.spec.make_pipeline("txt2img", {**c.text_modules(), "vae": c.vae, "unet": c.unet,
                                            "scheduler": FlowMatchEulerDiscreteScheduler.from_config(
                                                c.scheduler_config)})
    # equal weights at other memory alignments take other SIMD paths (1e-7 apart): give both fresh buffers
    for pipe in (ref, ours):
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
            for p in module.parameters():
                p.data = p.data.clone()
    kw = dict(prompt="a red circle", negative_prompt="blurry", height=64, width=64, num_inference_steps=3,
              guidance_scale=2.0)
    a = np.asarray(ref(generator=torch.Generator().manual_seed(7), **kw).images[0])
    b = np.asarray(ours(generator=torch.Generator().manual_seed(7), **kw).images[0])
    assert a.shape == (64, 64, 3) and a.std() > 0 and (a == b).all()


# ---- generation through the studio ---------------------------------------------------------------------------
def bare_pipeline(studio, cls_name: str = "ZImagePipeline"):
    """diffusers' own pipeline over the very modules the studio loaded (its own encoding, sampling, decoding)."""
    import diffusers
    with studio.manager.acquire(CKPT, "Automatic") as loaded:
        c = loaded.components
    pipe = getattr(diffusers, cls_name)(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config), vae=c.vae,
        text_encoder=c.text_encoder, tokenizer=c.tokenizer, transformer=c.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("cfg,negative", [(1.0, ""), (3.0, "blurry, green")])
def test_txt2img_is_diffusers_zimage_pipeline_pixel_for_pixel(studio, cfg, negative):
    ours = studio.generate(req(cfg_scale=cfg, negative_prompt=negative, batch_size=2))
    bare = bare_pipeline(studio)(prompt=BASE["prompt"], negative_prompt=negative, height=64, width=64,
                                 num_inference_steps=3, guidance_scale=cfg - 1.0, num_images_per_prompt=2,
                                 generator=[torch.Generator().manual_seed(s) for s in (7, 8)]).images
    assert len(ours.images) == 2 and px(ours.images[0]).std() > 0
    for mine, theirs in zip(ours.images, bare):
        assert np.array_equal(px(mine), px(theirs))
    assert f"Model: {CKPT.removesuffix('.safetensors')}" in ours.infotexts[0]
    assert f"CFG scale: {cfg:g}" in ours.infotexts[0] and "Distilled" not in ours.infotexts[0]


def test_cfg_above_one_runs_the_negative_prompt(studio):
    a = px(studio.generate(req(cfg_scale=3.0, negative_prompt="green")).images[0])
    b = px(studio.generate(req(cfg_scale=3.0, negative_prompt="purple")).images[0])
    c = px(studio.generate(req(negative_prompt="green")).images[0])
    d = px(studio.generate(req(negative_prompt="purple")).images[0])
    assert not np.array_equal(a, b) and np.array_equal(c, d)     # CFG 1: the negative prompt is not run


def test_weights_syntax_is_removed_and_prompt_schedules_swap_the_sequence(studio):
    plain = px(studio.generate(req(prompt="a red circle")).images[0])
    weighted = px(studio.generate(req(prompt="a (red:1.6) circle")).images[0])
    assert np.array_equal(plain, weighted)      # A1111 emphasis is not applied to Z-Image prompts
    # with CFG, so the step callback swaps the negative sequences too
    red, blue, swapped = (px(studio.generate(req(prompt=p, cfg_scale=2.0, negative_prompt="green")).images[0])
                          for p in ("a red circle", "a blue circle", "a [red:blue:0.5] circle"))
    assert not np.array_equal(swapped, red) and not np.array_equal(swapped, blue)


def test_live_previews_are_drawn_from_its_latents(studio):
    import time
    shown = []

    class Ctx:
        job_id, interrupted, skipped = "", False, False

        def set_progress(self, *a, **k): ...
        def set_preview(self, image): shown.append(image)
        def clear_skip(self): ...

    studio.engine.generate(req(steps=4), Ctx())
    deadline = time.time() + 10
    while not shown and time.time() < deadline:
        time.sleep(0.05)
    assert shown and shown[0].size == (64, 64)


def test_a_multistep_sampler_runs_as_euler_on_its_fixed_shift_and_says_so(studio):
    res = studio.generate(req(sampler_name="DPM++ 2M"))
    assert np.array_equal(px(res.images[0]), px(studio.generate(req()).images[0]))
    assert any("fixed shift, so Euler was used" in w for w in res.warnings)


def test_the_ui_gets_the_turbo_defaults(studio):
    with studio.manager.acquire(CKPT, "Automatic") as loaded:
        got = loaded.components.spec.generation_defaults(loaded.components)
    assert got == {"steps": 9, "cfg_scale": 1.0, "sampler_name": "Euler", "scheduler": "Simple", "width": 1024,
                   "height": 1024}


def test_sizes_its_patches_cannot_hold_are_refused(studio):
    from studio.errors import StudioError
    with pytest.raises(StudioError, match="must be multiples of 16"):
        studio.generate(req(width=72))


def _init(seed=0):
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def test_img2img_is_diffusers_zimage_img2img(studio):
    from diffusers.image_processor import VaeImageProcessor

    from studio import vae_codec
    init = _init()
    ours = studio.generate(req(mode="img2img", init_images=(init,), denoising_strength=0.6, steps=5, resize_mode=0))
    pipe = bare_pipeline(studio, "ZImageImg2ImgPipeline")
    # the studio encodes the init image deterministically (the latent distribution's mode, as A1111 does);
    # diffusers would sample it with the generator: hand it the same latents (its processor passes only
    # 4-channel latents through, so it is told this VAE's 16)
    pipe.image_processor = VaeImageProcessor(vae_scale_factor=16, vae_latent_channels=16)
    z = vae_codec.encode(pipe, init, height=64, width=64)
    bare = pipe(prompt=BASE["prompt"], image=z, height=64, width=64, strength=0.6, num_inference_steps=5,
                guidance_scale=0.0, generator=torch.Generator().manual_seed(7)).images[0]
    assert px(ours.images[0]).std() > 0 and np.array_equal(px(ours.images[0]), px(bare))


def test_inpaint_keeps_the_unmasked_pixels(studio):
    init = _init(1)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    res = studio.generate(req(mode="inpaint", init_images=(init,), mask=mask, denoising_strength=0.9, mask_blur=0,
                              inpainting_fill=1))
    out, src = px(res.images[0]), px(init)
    assert np.abs(out[:8] - src[:8]).mean() < 12                        # outside: the init image (through the VAE)
    assert np.abs(out[24:40, 24:40] - src[24:40, 24:40]).mean() > 20    # inside: redrawn


def test_hires_fix_makes_the_bigger_picture(studio):
    res = studio.generate(req(enable_hr=True, hr_scale=2.0, hr_upscaler="Latent", hr_denoising_strength=0.5))
    assert res.images[0].size == (128, 128) and px(res.images[0]).std() > 0


def test_txt2img_over_the_a1111_api(studio):
    import httpx

    from tests.api.conftest import make_app, serve
    body = dict(prompt="a red circle", width=64, height=64, steps=3, cfg_scale=1, sampler_name="Euler", seed=5)
    with serve(make_app(studio)) as url:
        ok = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)
        bad = httpx.post(f"{url}/sdapi/v1/txt2img", json={**body, "width": 72}, timeout=120)
    assert ok.status_code == 200, ok.text
    assert "Model: z_image_turbo_tiny" in ok.json()["info"]
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(ok.json()["images"][0]))))
    assert image.shape == (64, 64, 3) and image.std() > 0
    direct = px(studio.generate(req(prompt="a red circle", seed=5)).images[0])
    assert np.array_equal(image.astype(np.int16), direct)
    assert bad.status_code == 422 and "multiples of 16" in bad.text


# ---- merge and adapters --------------------------------------------------------------------------------------
def test_weighted_sum_of_two_zimage_checkpoints(studio):
    from safetensors.torch import load_file

    from studio.merge import MergeSpec, merge_checkpoints
    s = studio.settings
    a = load_file(str(s.ckpt_path / CKPT))
    b = load_file(str(s.ckpt_path / "z_image_other_tiny.safetensors"))
    out = merge_checkpoints(MergeSpec(a="z_image_turbo_tiny", b="z_image_other_tiny", multiplier=0.25,
                                      output_name="zimage-merge"), studio.registry, s)
    m = load_file(str(out))
    assert set(m) == set(a) and len(a) > 50
    for k in a:
        torch.testing.assert_close(m[k].float(), (0.75 * a[k].float() + 0.25 * b[k].float()).to(m[k].dtype).float(),
                                   atol=1e-3, rtol=1e-3, msg=k)
    c = load_single_file(out, companions=lambda: _companions(s.ckpt_path.parent))
    assert c.family == "zimage"


def test_lora_names_and_metadata_tell_zimage():
    assert families.from_lora(set(), unet_layers=frozenset({"layers", "noise_refiner"})).name == "zimage"
    assert families.from_lora(set(), unet_layers=frozenset({"double_blocks"})).name == "flux"
    assert families.from_version("zimage").name == "zimage"


def test_tongyi_lora_layer_names_reach_diffusers_modules(store):
    from studio.adapters.keys import FusedLayer
    c = store["ref"]
    names = c.spec.lora_layer_names(c.unet)
    qkv = names["layers_0_attention_qkv"]
    assert isinstance(qkv, FusedLayer) and tuple(qkv.weight.shape) == (768, 256)
    assert [p[0] for p in qkv.parts] == [c.unet.layers[0].attention.to_q, c.unet.layers[0].attention.to_k,
                                          c.unet.layers[0].attention.to_v]
    assert names["layers_0_attention_out"] is c.unet.layers[0].attention.to_out[0]
    assert names["x_embedder"] is c.unet.all_x_embedder["2-1"]
    assert names["final_layer_linear"] is c.unet.all_final_layer["2-1"].linear
