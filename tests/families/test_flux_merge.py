"""Two FLUX.1 checkpoints merge like SD ones (every tensor by the formula), and the result loads as FLUX."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from studio.errors import StudioError
from studio.merge import MergeSpec, merge_checkpoints


def test_weighted_sum_of_two_flux_checkpoints(flux_studio):
    from studio.loading.single_file import load_single_file
    s = flux_studio.settings
    a = load_file(str(s.ckpt_path / "flux1-dev-tiny.safetensors"))
    b = load_file(str(s.ckpt_path / "flux1-schnell-tiny.safetensors"))
    out = merge_checkpoints(MergeSpec(a="flux1-dev-tiny", b="flux1-schnell-tiny", multiplier=0.25,
                                      output_name="flux-merge"), flux_studio.registry, s)
    m = load_file(str(out))
    shared = [k for k in a if k in b and a[k].shape == b[k].shape and a[k].is_floating_point()]
    assert len(shared) > 200
    for k in shared:
        torch.testing.assert_close(m[k].float(), (0.75 * a[k].float() + 0.25 * b[k].float()).to(m[k].dtype).float(),
                                   atol=1e-3, rtol=1e-3, msg=k)
    c = load_single_file(out)
    assert c.family == "flux"


def test_flux_and_sd_do_not_merge(flux_studio, model_store):
    import shutil
    shutil.copy(model_store / "Stable-diffusion" / "tiny-sd1.safetensors", flux_studio.settings.ckpt_path)
    flux_studio.registry.refresh()
    with pytest.raises(StudioError, match="FLUX.1 but model A .* is SD 1.x|is SD 1.x but model A .* is FLUX.1"):
        merge_checkpoints(MergeSpec(a="tiny-sd1", b="flux1-dev-tiny", output_name="bad"), flux_studio.registry,
                          flux_studio.settings)
