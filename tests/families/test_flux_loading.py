"""FLUX.1 files as users have them load into the same modules diffusers builds, and draw the same pixels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from studio import families
from studio.errors import ModelLoadError
from studio.families import flux_keys
from studio.loading.diffusers_folder import load_diffusers_folder
from studio.loading.single_file import load_single_file
from studio.loading.state_dict import read_header_shapes
from tests.tinyflux import flux_state_dict, make_tiny_flux, write_flux_folder, write_flux_single_file


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    dev, schnell = make_tiny_flux(seed=1, guidance=True), make_tiny_flux(seed=2, guidance=False)
    return {"dev": dev, "schnell": schnell,
            "dev_file": write_flux_single_file(dev, root / "flux1-dev-aio.safetensors"),
            "schnell_file": write_flux_single_file(schnell, root / "flux1-schnell-aio.safetensors"),
            "bare": write_flux_single_file(dev, root / "flux1-dev.safetensors", all_in_one=False),
            "folder": write_flux_folder(dev, root / "FLUX.1-dev")}


def _equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bfl_keys_round_trip_exactly(files):
    c = files["dev"]
    back = flux_keys.to_diffusers(flux_state_dict(c, all_in_one=False))
    ref = c.unet.state_dict()
    assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref)


@pytest.mark.parametrize("name", ["dev_file", "schnell_file", "bare"])
def test_the_header_says_flux(files, name):
    assert families.detect_ldm(read_header_shapes(files[name]), files[name]).name == "flux"


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_all_in_one_file_loads_every_part_exactly(files, variant):
    c = load_single_file(files[f"{variant}_file"])
    ref = files[variant]
    assert c.family == "flux" and c.spec.label == "FLUX.1" and c.in_channels == 64
    assert c.unet.config.guidance_embeds is (variant == "dev")
    assert c.scheduler_config["use_dynamic_shifting"] is (variant == "dev")
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert _equal(getattr(c, part), getattr(ref, part)), part
    assert c.vae.config.scaling_factor == 0.3611 and c.vae.config.shift_factor == 0.1159
    assert not c.vae.config.use_quant_conv
    assert any("dev" in n or "schnell" in n for n in c.notes)


def test_transformer_only_file_names_what_is_missing(files):
    with pytest.raises(ModelLoadError, match="transformer only; the CLIP-L text encoder, the T5-XXL text encoder, "
                                             "the VAE are not in it"):
        load_single_file(files["bare"])


def test_folder_loads_as_flux(files):
    c = load_diffusers_folder(files["folder"])
    assert c.family == "flux"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert _equal(getattr(c, part), getattr(files["dev"], part)), part


def test_same_pixels_as_the_diffusers_pipeline_from_the_folder(files):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    ref = FluxPipeline.from_pretrained(files["folder"], local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    c = load_single_file(files["dev_file"])
    ours = c.spec.make_pipeline("txt2img", {**c.text_modules(), "vae": c.vae, "unet": c.unet,
                                            "scheduler": FlowMatchEulerDiscreteScheduler.from_config(
                                                c.scheduler_config)})
    kw = dict(prompt="a red circle", height=64, width=64, num_inference_steps=3, guidance_scale=3.5,
              max_sequence_length=32)
    # equal weights at other memory alignments take other SIMD paths (1e-7 apart): give both fresh buffers
    for pipe in (ref, ours):
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            for p in module.parameters():
                p.data = p.data.clone()
    a = np.asarray(ref(generator=torch.Generator().manual_seed(7), **kw).images[0])
    b = np.asarray(ours(generator=torch.Generator().manual_seed(7), **kw).images[0])
    assert a.shape == (64, 64, 3) and a.std() > 0 and (a == b).all()
