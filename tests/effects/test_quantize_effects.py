"""int8 weight-only quantisation (``quantize``) on the demo model: the pictures stay close to the float ones and keep
their colour and shape (the scorer's names); the UNet's linear layers are held at a quarter of their fp32 bytes."""
from __future__ import annotations

import numpy as np

from studio import quantize
from studio.demo import TRAINED_NAME
from tests.effects.effects import draw, score
from tests.effects.test_txt2img_effects import GRID


def test_int8_keeps_colour_and_shape(demo_studio):
    settings = demo_studio.settings
    hits = {"float": 0, "int8": 0}
    diffs = []
    try:
        for k, (colour, shape, background) in enumerate(GRID):
            prompt, seeds = f"a {colour} {shape} on a {background} background", list(range(700 + 3 * k, 703 + 3 * k))
            settings.quantize = "none"
            plain = draw(demo_studio, prompt, seeds)
            settings.quantize = "int8"
            quantised = draw(demo_studio, prompt, seeds)
            for name, images in (("float", plain), ("int8", quantised)):
                hits[name] += sum(s.colour == colour and s.shape == shape for s in map(score, images))
            diffs += [np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()
                      for a, b in zip(plain, quantised)]
        with demo_studio.manager.acquire(TRAINED_NAME, "Automatic") as loaded:
            unet = loaded.components.unet
            linears = [m for m in unet.modules() if hasattr(m, "weight") and quantize.is_quantised(m.weight)]
            assert linears
            assert sum(map(quantize.tensor_bytes, (m.weight for m in linears))) <= 0.27 * sum(
                m.weight.numel() * 4 for m in linears)
    finally:
        settings.quantize = "none"
        m = demo_studio.manager               # the int8 copy is not needed by the session's other tests
        for key in [key for key in m._entries if key[0] == "ckpt" and key[-1] == "int8"]:
            m._drop(key)
    n = 3 * len(GRID)
    assert 0 < np.mean(diffs) < 3.0, diffs       # mean |difference| of 0-255 pixels
    assert hits["int8"] >= hits["float"] - 1 and hits["int8"] >= 0.8 * n, hits
