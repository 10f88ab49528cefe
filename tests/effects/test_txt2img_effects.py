"""txt2img with the trained demo model does what the prompt says: colour, shape, negative prompt, emphasis, prompt
editing, batches. Each effect is a rate over several seeds, with a bar below the measured rate (in the comment).
"""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from tests.effects.effects import draw, request, save_grid, score

GRID = [("red", "circle", "blue"), ("yellow", "square", "black"), ("green", "triangle", "white"),
        ("blue", "star", "yellow"), ("purple", "cross", "white"), ("white", "ring", "green")]


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, np.float32) for im in images])


def test_txt2img_follows_colour_shape_and_background(demo_studio):
    hits = {"colour": 0, "shape": 0, "background": 0}
    rows = []
    for k, (colour, shape, background) in enumerate(GRID):
        images = draw(demo_studio, f"a {colour} {shape} on a {background} background", list(range(100 + 4 * k,
                                                                                             104 + 4 * k)))
        rows.append(images)
        for s in map(score, images):
            hits["colour"] += s.colour == colour
            hits["shape"] += s.shape == shape
            hits["background"] += s.background == background
    save_grid("txt2img-grid", rows)
    n = 4 * len(GRID)
    # measured: colour 24/24, shape 24/24, background 24/24
    assert hits["colour"] >= 0.85 * n and hits["shape"] >= 0.75 * n and hits["background"] >= 0.85 * n, hits


def test_negative_prompt_red_lowers_redness(demo_studio):
    """"an orange circle" sits between red and yellow: a negative "red" pushes it away from red (to yellow)."""
    seeds = list(range(200, 208))
    prompt = "an orange circle on a blue background"
    plain = [score(im) for im in draw(demo_studio, prompt, seeds)]
    negative = [score(im) for im in draw(demo_studio, prompt, seeds, negative_prompt="red")]
    d_plain = np.array([s.colour_distances["red"] for s in plain])      # Lab distance to red: lower = redder
    d_neg = np.array([s.colour_distances["red"] for s in negative])
    # measured: mean distance to red 66.1 without, 102.1 with the negative, 8/8 seeds less red (16 seeds: 64.9 vs
    # 106.0, 16/16); the circle turns from orange to yellow
    assert (d_neg > d_plain).sum() >= 7, (d_plain, d_neg)
    assert d_neg.mean() - d_plain.mean() >= 20, (d_plain.mean(), d_neg.mean())
    assert sum(s.colour == "red" for s in negative) == 0


def test_emphasis_moves_redness(demo_studio):
    """In "a red yellow circle" red competes with yellow (the model draws orange): (red:1.4) gives a redder
    orange than [red] (weight 1/1.1), seed for seed."""
    seeds = list(range(300, 308))
    strong = [score(im) for im in draw(demo_studio, "a (red:1.4) yellow circle on a blue background", seeds)]
    weak = [score(im) for im in draw(demo_studio, "a [red] yellow circle on a blue background", seeds)]
    d_strong = np.array([s.colour_distances["red"] for s in strong])
    d_weak = np.array([s.colour_distances["red"] for s in weak])
    # measured: (red:1.4) nearer to red than [red] in 8/8 seeds, mean distance 37.9 vs 40.6 (16 seeds: 16/16)
    assert (d_strong < d_weak).sum() >= 7, (d_strong, d_weak)
    assert d_weak.mean() - d_strong.mean() >= 1.0, (d_strong.mean(), d_weak.mean())


def test_prompt_editing_changes_the_result(demo_studio):
    """[circle:square:0.5] draws circle for the first half of the steps, then square: the result is neither plain
    prompt's picture. (This model settles a shape's outline late, so it ends as a square.)"""
    seeds = list(range(400, 408))
    images = {k: draw(demo_studio, f"a red {k} on a blue background", seeds)
              for k in ("circle", "square", "[circle:square:0.5]", "[square:circle:0.5]")}
    save_grid("prompt-editing", list(images.values()))
    edited = _pixels(images["[circle:square:0.5]"])
    from_circle = np.abs(edited - _pixels(images["circle"])).mean(axis=(1, 2, 3))
    from_square = np.abs(edited - _pixels(images["square"])).mean(axis=(1, 2, 3))
    # measured: mean |difference| 14-28 (of 255) from plain circle, 3-25 from plain square, per seed
    assert (from_circle > 2).all() and (from_square > 2).sum() >= 7, (from_circle, from_square)
    # measured: 8/8 scored square; the reverse edit 8/8 circle
    assert sum(score(im).shape == "square" for im in images["[circle:square:0.5]"]) >= 6
    assert sum(score(im).shape == "circle" for im in images["[square:circle:0.5]"]) >= 6


def test_batch_gives_a_different_picture_per_seed(demo_studio):
    result = demo_studio.generate(request("a green star on a white background", 500, batch_size=4))
    assert result.seeds == [500, 501, 502, 503]
    arr = _pixels(result.images)
    for i in range(4):
        for j in range(i + 1, 4):   # measured: mean |difference| 25-34 (of 255) between any two
            assert np.abs(arr[i] - arr[j]).mean() > 5, (i, j)
    # each picture is its seed's picture: the same as drawn alone
    alone = draw(demo_studio, "a green star on a white background", [502])[0]
    assert np.abs(arr[2] - np.asarray(alone, np.float32)).max() <= 2


def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def test_api_txt2img_follows_the_prompt(api_client):
    """The A1111 REST path has the same effect (the same GenerationRequest underneath)."""
    body = {"prompt": "a yellow square on a black background", "seed": 600, "batch_size": 4, "steps": 20,
            "sampler_name": "DPM++ 2M", "scheduler": "Karras", "cfg_scale": 7, "width": 64, "height": 64}
    r = api_client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    scores = [score(_decode(b)) for b in r.json()["images"]]
    assert len(scores) == 4
    # measured: 4/4 yellow square on black
    assert sum(s.colour == "yellow" and s.shape == "square" and s.background == "black" for s in scores) >= 3
    neg = api_client.post("/sdapi/v1/txt2img", json={**body, "prompt": "an orange circle on a blue background",
                                                     "negative_prompt": "red"})
    plain = api_client.post("/sdapi/v1/txt2img", json={**body, "prompt": "an orange circle on a blue background"})
    d_neg = np.mean([score(_decode(b)).colour_distances["red"] for b in neg.json()["images"]])
    d_plain = np.mean([score(_decode(b)).colour_distances["red"] for b in plain.json()["images"]])
    # measured: mean distance to red 65.2 without, 104.7 with the negative (the engine's numbers)
    assert d_neg - d_plain >= 15, (d_plain, d_neg)
