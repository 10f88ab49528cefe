"""img2img, inpaint, outpaint and hires fix with the trained demo model: what each does to the picture.

Init pictures are world pictures (``studio.demo_world.World``) of medium and large objects: a small object is a
few latent pixels, which any img2img pass redraws. Bars sit below the measured rates noted beside them.
"""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from studio.demo_world import World, box_iou, caption, mask_iou
from studio.masking import outpaint_canvas
from tests.effects.effects import (box_mask, colour_shares, draw, grow, other_colour, out_of_reach, request,
                                   save_grid, score)

BIG = ("medium", "large")


def _samples(seed: int, count: int, side: int = 64, **restrict):
    """World pictures of ``side`` px; ``restrict`` limits the world (``size`` is the object's size name)."""
    return list(World(seed, **restrict).samples(count, side))


def test_img2img_low_denoise_keeps_the_position(demo_studio):
    samples = _samples(21, 8, size=BIG)
    ious, out = [], []
    for i, smp in enumerate(samples):
        r = demo_studio.generate(request(caption(smp.label, 0, with_size=False), 700 + i, mode="img2img",
                                         init_images=(smp.image,), denoising_strength=0.3))
        out.append(r.images[0])
        ious.append(mask_iou(score(smp.image).mask, score(r.images[0]).mask))
    save_grid("img2img-0.3", [[s.image for s in samples], out])
    # measured: IoU 0.74-0.91, median 0.85, 6/8 >= 0.8 (denoising 0.5: median 0.78; 0.8: most objects move)
    assert sum(v >= 0.8 for v in ious) >= 5 and np.median(ious) >= 0.8, ious


def test_img2img_high_denoise_takes_the_prompted_colour(demo_studio):
    samples = _samples(22, 8, size=BIG)
    got, out = [], []
    for i, smp in enumerate(samples):
        lab = smp.label
        target = other_colour(lab.colour, lab.background, order=("purple", "yellow", "red"))
        r = demo_studio.generate(request(f"a {target} {lab.shape} on a {lab.background} background", 720 + i,
                                         mode="img2img", init_images=(smp.image,), denoising_strength=0.8))
        out.append(r.images[0])
        got.append((score(r.images[0]).colour, target, lab.colour))
    save_grid("img2img-0.8", [[s.image for s in samples], out])
    # measured: 8/8 the prompted colour, 0/8 the old one
    assert sum(c == t for c, t, _ in got) >= 6, got
    assert sum(c == old for c, _, old in got) <= 1, got


def test_inpaint_masked_object_takes_the_prompt_and_the_rest_stays(demo_studio):
    """Mask the object's box (+4 px); prompt another colour: the new object is that colour, the old colour is
    gone from the mask, and pixels the blurred mask cannot reach are the original ones exactly."""
    samples = _samples(12, 12, size=BIG, shape=("circle", "square", "triangle", "star", "cross"),
                       background=("blue", "green", "black", "purple"))
    hits, cleared, out = 0, 0, []
    for i, smp in enumerate(samples):
        lab = smp.label
        mask = box_mask(grow(score(smp.image).box, 4, 64))
        target = other_colour(lab.colour, lab.background)
        r = demo_studio.generate(request(f"a {target} circle on a {lab.background} background", 740 + i,
                                         mode="inpaint", init_images=(smp.image,), mask=mask, mask_blur=4,
                                         inpainting_fill=1, denoising_strength=0.9))
        image = r.images[0]
        out.append(image)
        hits += score(image).colour == target
        cleared += colour_shares(image, np.asarray(mask) > 0)[lab.colour] < 0.05
        keep = out_of_reach(mask, 4)
        assert np.array_equal(np.asarray(image)[keep], np.asarray(smp.image)[keep]), i
    save_grid("inpaint", [[s.image for s in samples], out])
    # measured: prompted colour 11/12 (16 cases: 15/16), old colour < 5 % of the mask 11/12
    assert hits >= 9 and cleared >= 10, (hits, cleared)


def test_inpaint_only_masked_with_padding(demo_studio):
    """"Only masked" on 128 px pictures: the masked box plus 8 px padding is drawn at 64 px and pasted back; the
    result keeps the picture's size, the object takes the prompted colour, the rest stays exact."""
    samples = _samples(13, 8, side=128, size=("small", "medium"),
                       shape=("circle", "square", "triangle", "cross"), background=("blue", "green", "black", "purple"))
    hits, out = 0, []
    for i, smp in enumerate(samples):
        lab = smp.label
        mask = box_mask(grow(score(smp.image).box, 4, 128), (128, 128))
        target = other_colour(lab.colour, lab.background)
        r = demo_studio.generate(request(f"a {target} circle on a {lab.background} background", 760 + i,
                                         mode="inpaint", init_images=(smp.image,), mask=mask, mask_blur=2,
                                         inpainting_fill=1, denoising_strength=0.9, inpaint_full_res=True,
                                         inpaint_full_res_padding=8))
        image = r.images[0]
        out.append(image)
        assert image.size == (128, 128)
        assert "Inpaint area: Only masked" in r.infotexts[0]
        hits += score(image).colour == target
        keep = out_of_reach(mask, 2)
        assert np.array_equal(np.asarray(image)[keep], np.asarray(smp.image)[keep]), i
    save_grid("inpaint-only-masked", [[s.image for s in samples], out])
    # measured: 8/8 (padding 16: 7/8, padding 32: 6/8 - more context, a smaller object in the crop)
    assert hits >= 6, hits


def test_inpaint_only_masked_adds_an_object_to_an_empty_area(demo_studio):
    """Mask the empty lower half's middle of 128 px pictures (the object sits at the top): "only masked" draws the
    prompted object there, and the old object above is untouched."""
    samples = _samples(14, 8, side=128, size=("small",), position=("top left", "top right"),
                       background=("blue", "green", "black", "purple"))
    box = (32, 64, 96, 128)
    mask = box_mask(box, (128, 128))
    keep = out_of_reach(mask, 2)
    hits, out = 0, []
    for i, smp in enumerate(samples):
        lab = smp.label
        target = other_colour(lab.colour, lab.background)
        r = demo_studio.generate(request(f"a {target} circle on a {lab.background} background", 820 + i,
                                         mode="inpaint", init_images=(smp.image,), mask=mask, mask_blur=2,
                                         inpainting_fill=1, denoising_strength=1.0, inpaint_full_res=True,
                                         inpaint_full_res_padding=8))
        image = r.images[0]
        out.append(image)
        hits += score(image.crop(box)).colour == target
        assert np.array_equal(np.asarray(image)[keep], np.asarray(smp.image)[keep]), i
        assert score(image.crop((0, 0, 128, 56))).colour == lab.colour
    save_grid("inpaint-empty-area", [[s.image for s in samples], out])
    # measured: 12/12 (whole-picture inpaint of a 32 px empty box at 64 px: 6/8, a 4x4-latent area is cramped)
    assert hits >= 6, hits


def test_outpaint_continues_the_background(demo_studio):
    """Extend 64 px pictures by 32 px to the right (the tab's outpaint canvas: edge-filled, new area masked)."""
    samples = _samples(15, 8, size=("small", "medium"), position=("left", "centre"))
    border, shares, out = 0, [], []
    for i, smp in enumerate(samples):
        lab = smp.label
        canvas, mask = outpaint_canvas(smp.image, 0, 32, 0, 0)
        r = demo_studio.generate(request(caption(lab, 0, with_size=False), 780 + i, mode="inpaint", width=96,
                                         init_images=(canvas,), mask=mask, inpainting_fill=0,
                                         denoising_strength=0.75))
        image = r.images[0]
        out.append(image)
        border += score(image).background == lab.background
        shares.append(colour_shares(image.crop((64, 0, 96, 64)))[lab.background])
    save_grid("outpaint", [out])
    # measured: border background right 8/8; background share of the new strip 0.62-1.0 (8/8 >= 0.6)
    assert border >= 7 and sum(s >= 0.6 for s in shares) >= 6, (border, shares)


def test_hires_fix_keeps_shape_colour_and_position(demo_studio):
    """Hires fix 2x (Lanczos, denoising 0.2) against the first pass alone, seed for seed.

    The model only knows 64 px: at 128 px a second pass at 0.5 redraws outlines it never saw at that scale
    (crosses and rings melt into blobs, objects shift; measured on 12 pairs: shape kept 7, box IoU >= 0.8 in 4).
    At 0.2 the pass sharpens the upscale without recomposing it (shape 11/12, colour 11/12, box IoU >= 0.75
    in 11/12), which is what hires fix is for; so that is the setting tested.
    """
    world = World(17, size=BIG)
    shape_kept, colour_kept, ious, rows = 0, 0, [], [[], []]
    for i in range(8):
        prompt = caption(world.label(i, 64), 0, with_size=False)
        low = draw(demo_studio, prompt, [800 + i])[0]
        high = draw(demo_studio, prompt, [800 + i], enable_hr=True, hr_scale=2.0, hr_upscaler="Lanczos",
                    hr_denoising_strength=0.2)[0]
        assert high.size == (128, 128)
        rows[0].append(low.resize((128, 128), Image.NEAREST))
        rows[1].append(high)
        s0, s1 = score(low), score(high)
        shape_kept += s1.shape == s0.shape
        colour_kept += s1.colour == s0.colour
        ious.append(box_iou(tuple(2 * v for v in s0.box), s1.box))
    save_grid("hires", rows)
    # measured: shape 7/8, colour 7/8, box IoU 0.69-0.97 (7/8 >= 0.7, median 0.89)
    assert shape_kept >= 6 and colour_kept >= 6, (shape_kept, colour_kept)
    assert sum(v >= 0.7 for v in ious) >= 6 and np.median(ious) >= 0.8, ious


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def test_api_img2img_and_inpaint_have_the_effect(api_client, demo_studio):
    """/sdapi/v1/img2img with base64 images: low denoise keeps the object; a mask repaints only the masked area.
    The API's pictures are the engine's for the same fields (one GenerationRequest path)."""
    # the first picture of the engine test above (its IoU there 0.91); this one has a non-yellow, non-blue object
    smp = _samples(21, 1, size=BIG)[0]
    lab = smp.label
    body = {"prompt": caption(lab, 0, with_size=False), "seed": 900, "steps": 20, "sampler_name": "DPM++ 2M",
            "scheduler": "Karras", "cfg_scale": 7, "width": 64, "height": 64, "init_images": [_b64(smp.image)],
            "denoising_strength": 0.3, "batch_size": 4}
    r = api_client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    images = [_decode(b) for b in r.json()["images"]]
    engine = demo_studio.generate(request(body["prompt"], 900, mode="img2img", init_images=(smp.image,),
                                          denoising_strength=0.3, batch_size=4)).images
    assert [np.asarray(a).tolist() == np.asarray(b).tolist() for a, b in zip(images, engine)] == [True] * 4
    ious = [mask_iou(score(smp.image).mask, score(im).mask) for im in images]
    # measured: IoU 0.92 for each of the 4 seeds (denoising 0.3 leaves the seed little to change)
    assert np.median(ious) >= 0.75 and all(score(im).colour == lab.colour for im in images), ious

    mask = box_mask(grow(score(smp.image).box, 4, 64))
    target = other_colour(lab.colour, lab.background)
    r = api_client.post("/sdapi/v1/img2img", json={
        **body, "prompt": f"a {target} circle on a {lab.background} background", "denoising_strength": 0.9, "mask": _b64(mask),
        "mask_blur": 4, "inpainting_fill": 1, "inpaint_full_res": False})
    assert r.status_code == 200, r.text
    images = [_decode(b) for b in r.json()["images"]]
    keep = out_of_reach(mask, 4)
    # measured: 4/4 the prompted colour
    assert sum(score(im).colour == target for im in images) >= 3
    for image in images:
        assert np.array_equal(np.asarray(image)[keep], np.asarray(smp.image)[keep])
