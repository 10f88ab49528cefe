"""tools/train_demo end to end at --quick size: stages, resume, stop on SIGTERM, export, the studio's loader, eval."""
from __future__ import annotations

import signal

import pytest
import torch

from tools import train_demo as td


def _step(state_dir, name) -> int:
    return torch.load(state_dir / name, map_location="cpu", weights_only=False)["step"]


def test_quick_training_resumes_stops_exports_and_loads_back(tmp_path, capsys, monkeypatch):
    state, out = tmp_path / "state", tmp_path / "demo.safetensors"
    base = ["--quick", "--state", str(state), "--out", str(out)]

    assert td.main(base + ["--stage", "vae", "--steps", "2"]) == 0
    assert _step(state, "vae.pt") == 2 and not out.exists()
    assert td.main(base + ["--stage", "vae", "--steps", "3"]) == 0
    assert "vae: resuming at step 2/3" in capsys.readouterr().out
    assert _step(state, "vae.pt") == 3

    # a state made with other settings is refused with a fix, not silently mixed
    assert td.main(base + ["--stage", "vae", "--size", "96"]) == 2
    assert "another --state folder" in capsys.readouterr().out

    # SIGTERM mid-run: the step finishes, the state is saved, the run stops without exporting
    real_log = td.log

    def log_and_signal(text):
        real_log(text)
        if text.startswith("unet step 2/"):
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(td, "log", log_and_signal)
    assert td.main(base + ["--steps", "5"]) == 0
    monkeypatch.setattr(td, "log", real_log)
    assert _step(state, "unet.pt") == 2 and not out.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # handlers are put back

    assert td.main(base + ["--steps", "3"]) == 0
    text = capsys.readouterr().out
    assert "unet: resuming at step 2/3" in text and "vae: at step 3/3, nothing to train" in text
    assert out.is_file() and out.with_suffix(".md").is_file()

    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.diffusion_model.input_blocks.0.0.weight").dtype == torch.float16
    assert {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
            "first_stage_model.quant_conv.weight", "model.diffusion_model.out.2.weight"} <= keys

    # the studio's loader reads it back with the same architecture (SD1: 8 heads) and the same function
    from studio.loading.single_file import load_single_file
    c = load_single_file(out)
    assert c.family == "sd1" and c.unet.config.attention_head_dim == 8
    r = td.Recipe.quick()
    twin = td.make_unet(r)
    twin.load_state_dict(c.unet.state_dict())
    g = torch.Generator().manual_seed(0)
    x, h = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, r.text_width, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.allclose(twin.eval()(x, t, h).sample, c.unet(x, t, h).sample, atol=1e-5)
        # the folded latent scale: scaled latents of world pictures are about unit variance
        images, _ = td.world_images(r)
        z = td.encode_all(c.vae, images)
    assert 0.7 < float(z.std()) < 1.3

    # eval: txt2img through Studio / Engine (20 steps, DPM++ 2M Karras), scored, written into the card
    assert td.main(["--out", str(out), "--eval", "2"]) == 0
    assert "eval: colour" in capsys.readouterr().out
    card = out.with_suffix(".md").read_text()
    assert "| colour |" in card and "2 fixed prompt x seed pairs" in card


def test_bad_sizes_are_refused():
    with pytest.raises(td.StudioError, match="multiple of 8"):
        td.recipe_from(td.parse_args(["--quick", "--size", "60"]))
    with pytest.raises(td.StudioError, match="cannot halve"):
        td.recipe_from(td.parse_args(["--size", "72"]))
