"""img2img, inpaint, outpaint and hires fix: behaviour on tiny models, not just "it ran"."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from studio.errors import StudioError
from studio.masking import outpaint_canvas
from studio.request import GenerationRequest

BASE = dict(width=64, height=64, steps=4, prompt="a cube", seed=3, save_images=False, sampler_name="Euler")


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def picture(w: int = 64, h: int = 64) -> Image.Image:
    img = Image.new("RGB", (w, h), (40, 120, 200))
    d = ImageDraw.Draw(img)
    d.rectangle((w // 4, h // 4, w // 2, h // 2), fill=(230, 200, 20))
    d.ellipse((w // 2, h // 2, w - 4, h - 4), fill=(200, 30, 60))
    return img


def box_mask(w: int = 64, h: int = 64, box=(24, 24, 40, 40)) -> Image.Image:
    m = Image.new("L", (w, h), 0)
    ImageDraw.Draw(m).rectangle(box, fill=255)
    return m


def img2img(**kw) -> GenerationRequest:
    return GenerationRequest(**{**BASE, "mode": "img2img", "init_images": (picture(),), **kw})


def inpaint(**kw) -> GenerationRequest:
    return GenerationRequest(**{**BASE, "mode": "inpaint", "init_images": (picture(),), "mask": box_mask(),
                                "denoising_strength": 0.9, **kw})


def test_strength_zero_returns_nearly_the_input_and_one_ignores_it(studio):
    from studio.app import Studio  # noqa: F401 - fixture builds it

    zero = studio.generate(img2img(denoising_strength=0.0)).images[0]
    vae_roundtrip = np.abs(arr(zero) - arr(picture())).mean()
    one_a = studio.generate(img2img(denoising_strength=1.0)).images[0]
    other = picture().transpose(Image.FLIP_LEFT_RIGHT)
    one_b = studio.generate(img2img(denoising_strength=1.0, init_images=(other,))).images[0]
    # strength 1: the init image survives only through sqrt(alpha_bar) at t=999 (~0.07): a level or two at most
    assert np.abs(arr(one_a) - arr(one_b)).max() <= 3
    half = studio.generate(img2img(denoising_strength=0.5)).images[0]
    assert vae_roundtrip < np.abs(arr(half) - arr(picture())).mean()


def test_img2img_resize_modes_give_the_requested_size(studio):
    wide = picture(128, 64)
    for mode in range(4):
        res = studio.generate(img2img(init_images=(wide,), resize_mode=mode, width=64, height=64))
        assert res.images[0].size == (64, 64)
        assert "Denoising strength: 0.75" in res.infotexts[0]


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_inpaint_keeps_pixels_outside_the_blurred_mask(studio, fill):
    res = studio.generate(inpaint(inpainting_fill=fill, mask_blur=4))
    out, src = arr(res.images[0]), arr(picture())
    soft = np.asarray(box_mask().filter(__import__("PIL.ImageFilter", fromlist=["x"]).GaussianBlur(4)))
    outside = soft == 0
    assert np.array_equal(out[outside], src[outside])
    inside = np.asarray(box_mask()) == 255
    assert np.abs(out[inside] - src[inside]).mean() > 5
    assert "Mask blur: 4" in res.infotexts[0]


def test_masked_content_modes_differ(studio):
    outs = [arr(studio.generate(inpaint(inpainting_fill=f, denoising_strength=0.6)).images[0]) for f in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.array_equal(outs[i], outs[j]), (i, j)


def test_mask_invert_flips_what_changes(studio):
    res = studio.generate(inpaint(inpainting_mask_invert=1, mask_blur=0))
    out, src = arr(res.images[0]), arr(picture())
    inside = np.asarray(box_mask()) == 255
    assert np.array_equal(out[inside], src[inside])
    assert np.abs(out[~inside] - src[~inside]).mean() > 5
    assert "Mask mode: Inpaint not masked" in res.infotexts[0]


def test_only_masked_pastes_back_exactly_outside_the_crop(studio):
    big = picture(128, 128)
    mask = box_mask(128, 128, (56, 56, 72, 72))
    res = studio.generate(inpaint(init_images=(big,), mask=mask, inpaint_full_res=True, inpaint_full_res_padding=8,
                                  width=64, height=64))
    out = res.images[0]
    assert out.size == (128, 128)  # the original's size, not W×H
    o, s = arr(out), arr(big)
    far = np.ones((128, 128), bool)
    far[40:88, 40:88] = False
    assert np.array_equal(o[far], s[far])
    assert np.abs(o[60:68, 60:68] - s[60:68, 60:68]).mean() > 5
    assert "Inpaint area: Only masked" in res.infotexts[0]


def test_inpainting_checkpoint_inpaints(studio, models_dir):
    from tests import tinymodels

    tinymodels.write_single_file(tinymodels.make_tiny("sd1", seed=9, in_channels=9),
                                 models_dir / "Stable-diffusion" / "tiny-inpainting.safetensors")
    studio.registry.refresh()
    for fill in (1, 2):
        res = studio.generate(inpaint(checkpoint="tiny-inpainting.safetensors", inpainting_fill=fill, mask_blur=0))
        out, src = arr(res.images[0]), arr(picture())
        outside = np.asarray(box_mask()) == 0
        assert np.array_equal(out[outside], src[outside])


def test_outpaint_grows_and_keeps_old_pixels(studio):
    src = picture()
    canvas, mask = outpaint_canvas(src, left=0, right=32, up=0, down=0)
    assert canvas.size == (96, 64)
    res = studio.generate(inpaint(init_images=(canvas,), mask=mask, width=96, height=64, mask_blur=2,
                                  inpainting_fill=0, denoising_strength=1.0))
    out = arr(res.images[0])
    assert out.shape == (64, 96, 3)
    assert np.array_equal(out[:, :20], arr(src)[:, :20])  # well inside the old area: untouched


def test_hires_fix_size_and_infotext(studio):
    res = studio.generate(GenerationRequest(**{**BASE, "enable_hr": True, "hr_scale": 1.5,
                                               "hr_upscaler": "Latent (bicubic antialiased)",
                                               "hr_second_pass_steps": 2, "hr_denoising_strength": 0.6}))
    assert res.images[0].size == (96, 96)
    text = res.infotexts[0]
    for key in ("Denoising strength: 0.6", "Hires upscale: 1.5", "Hires steps: 2",
                "Hires upscaler: Latent (bicubic antialiased)", "Size: 64x64"):
        assert key in text, key
    lanczos = studio.generate(GenerationRequest(**{**BASE, "enable_hr": True, "hr_resize_x": 128,
                                                   "hr_resize_y": 96, "hr_upscaler": "Lanczos"}))
    assert lanczos.images[0].size == (128, 96) and "Hires resize: 128x96" in lanczos.infotexts[0]


def test_inpaint_outputs_go_to_img2img_folder(studio):
    res = studio.generate(inpaint(save_images=True))
    assert "/img2img-images/" in res.paths[0]


# ---- bad input ----------------------------------------------------------------------------------------------
def test_mask_of_other_size_is_resized_with_a_warning(studio):
    res = studio.generate(inpaint(mask=box_mask(32, 32, (12, 12, 20, 20))))
    assert any("resized" in w for w in res.warnings)


def test_empty_mask_is_explained(studio):
    with pytest.raises(StudioError) as err:
        studio.generate(inpaint(mask=Image.new("L", (64, 64), 0)))
    assert err.value.field == "mask" and "nothing is masked" in str(err.value)


def test_missing_init_image_named(studio):
    with pytest.raises(StudioError) as err:
        studio.generate(GenerationRequest(**{**BASE, "mode": "img2img"}))
    assert err.value.field == "init_images"


def test_non_image_and_bomb_refused(studio, tmp_path):
    with pytest.raises(StudioError) as err:
        studio.generate(img2img(init_images=(b"not an image at all",)))
    assert err.value.field == "init_images"
    huge = tmp_path / "huge.png"
    Image.new("L", (9000, 9000)).save(huge)
    with pytest.raises(StudioError) as err:
        studio.generate(img2img(init_images=(str(huge),)))
    assert "over the limit" in str(err.value)


def test_hires_and_inpaint_keys_read_back(studio):
    from studio.infotext import params_to_request_fields, parse_infotext

    res = studio.generate(GenerationRequest(**{**BASE, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos",
                                               "hr_second_pass_steps": 2, "hr_denoising_strength": 0.55}))
    f = params_to_request_fields(parse_infotext(res.infotexts[0]))
    assert (f["enable_hr"], f["hr_scale"], f["hr_upscaler"], f["hr_second_pass_steps"], f["hr_denoising_strength"]) \
        == (True, 1.5, "Lanczos", 2, 0.55)
    res = studio.generate(inpaint(inpainting_fill=2, inpaint_full_res=True, inpaint_full_res_padding=16,
                                  inpainting_mask_invert=1, mask_blur=6))
    f = params_to_request_fields(parse_infotext(res.infotexts[0]))
    assert (f["inpainting_fill"], f["inpaint_full_res"], f["inpaint_full_res_padding"], f["inpainting_mask_invert"],
            f["mask_blur"], f["denoising_strength"]) == (2, True, 16, 1, 6, 0.9)
