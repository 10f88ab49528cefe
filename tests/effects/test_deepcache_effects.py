"""DeepCache (``deepcache_interval``): the outer ring around fresh deep features is the whole UNet exactly; on the
demo model with every other model call run whole the pictures keep their colour and shape (the scorer's names)."""
from __future__ import annotations

import numpy as np
import torch

from studio import deepcache
from tests.effects.effects import draw, request, score
from tests.effects.test_txt2img_effects import GRID


def test_the_ring_around_fresh_deep_features_is_the_whole_unet(demo_studio):
    from studio.demo import TRAINED_NAME
    with demo_studio.manager.acquire(TRAINED_NAME, "Automatic") as loaded:
        unet = loaded.components.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad(), deepcache.deep_cache(unet, 2, warmup=1) as cache:
        first = unet(x, torch.tensor([900, 900]), encoder_hidden_states=text).sample     # step 0: warm-up, whole
        cache.step = 1
        whole = unet(x, torch.tensor([700, 700]), encoder_hidden_states=text).sample     # step 1: whole
        cache.step = 2
        ring = unet(x, torch.tensor([700, 700]), encoder_hidden_states=text).sample      # step 2: the ring
        cache.step = 3
        later = unet(x, torch.tensor([300, 300]), encoder_hidden_states=text).sample     # step 3: whole again
    assert cache.calls == 4 and cache.full == 3
    assert not torch.allclose(first, whole)
    torch.testing.assert_close(ring, whole, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(later, whole)
    assert "forward" not in unet.__dict__            # the model is left as it was


def test_every_other_call_keeps_colour_and_shape(demo_studio):
    settings = demo_studio.settings
    hits = {"plain": 0, "cached": 0}
    differ = 0
    for k, (colour, shape, background) in enumerate(GRID):
        prompt, seeds = f"a {colour} {shape} on a {background} background", list(range(500 + 3 * k, 503 + 3 * k))
        plain = draw(demo_studio, prompt, seeds)
        settings.deepcache_interval = 2
        try:
            cached = draw(demo_studio, prompt, seeds)
            info = demo_studio.generate(request(prompt, seeds[0], steps=4)).infotexts[0]
        finally:
            settings.deepcache_interval = 1
        for name, images in (("plain", plain), ("cached", cached)):
            hits[name] += sum(s.colour == colour and s.shape == shape for s in map(score, images))
        differ += sum(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, cached))
        assert "DeepCache: 2, DeepCache start: 0.4" in info
    n = 3 * len(GRID)
    assert differ == n, "DeepCache did not change the computation"
    # measured here: 18/18 without, 17-18/18 with (bench_speed over 48 pictures: shapes 100 % and 97.9 %)
    assert hits["cached"] >= hits["plain"] - 2 and hits["cached"] >= 0.8 * n, hits
