"""SDXL single files written by diffusers' convert_diffusers_to_original_sdxl.py (Linear-layout projection)."""
from __future__ import annotations

import pytest
import torch

from studio.loading.single_file import load_single_file
from studio.loading.state_dict import read_state_dict
from tests.tinymodels import make_tiny, write_single_file

PREFIX = {"sdxl": "conditioner.embedders.1.model.", "sdxl_refiner": "conditioner.embedders.0.model."}


@pytest.mark.parametrize("family", ["sdxl", "sdxl_refiner"])
def test_text_projection_weight_layout_loads_with_identical_output(family, tmp_path):
    from safetensors.torch import save_file

    tiny = make_tiny(family, seed=6)
    stability = write_single_file(tiny, tmp_path / "stability.safetensors")
    sd = read_state_dict(stability)
    key = PREFIX[family] + "text_projection"
    proj = sd.pop(key)
    sd[key + ".weight"] = proj.T.contiguous()          # what the diffusers script writes
    converted = tmp_path / "diffusers-script.safetensors"
    save_file(sd, str(converted))

    a, b = load_single_file(stability), load_single_file(converted)
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [0] * 3])
    with torch.no_grad():
        out_a = a.text_encoder_2(ids, output_hidden_states=True)
        out_b = b.text_encoder_2(ids, output_hidden_states=True)
    assert torch.equal(out_a.text_embeds, out_b.text_embeds)
    assert torch.equal(out_a.hidden_states[-2], out_b.hidden_states[-2])
    assert torch.equal(b.text_encoder_2.text_projection.weight, tiny.text_encoder_2.text_projection.weight)
