"""Refine: a run started from a finished run's weights (``network_weights``) begins exactly where the file ends."""
from __future__ import annotations

import pytest
import torch

from studio.errors import StudioError


def _deltas(unet) -> dict[str, torch.Tensor]:
    from peft.tuners.tuners_utils import BaseTunerLayer
    return {n: m.get_delta_weight("default").float() for n, m in unet.named_modules()
            if isinstance(m, BaseTunerLayer) and "default" in getattr(m, "scaling", {})}


@pytest.mark.parametrize("method,first,again", [
    ("lora", {"alpha": 4.0}, {"alpha": 1.0}),                # another alpha: the file's scale is carried over
    ("loha", {"conv_rank": 2, "conv_alpha": 1.0}, {"conv_alpha": 2.0}),
    ("lokr", {"conv_rank": 2}, {}),
])
def test_a_refined_run_starts_with_the_files_weights(make_cfg, tmp_path, method, first, again):
    from studio.training.trainer import Trainer
    done = Trainer(make_cfg(method=method, max_steps=2, learning_rate=1e-2, output_name="first",
                            run_dir=str(tmp_path / "first"), **first))
    out = done.run().output
    refined = Trainer(make_cfg(method=method, network_weights=str(out), output_name="again",
                               run_dir=str(tmp_path / "again"), **{**first, **again}))
    refined._setup()
    want, got = _deltas(done.c.unet), _deltas(refined.c.unet)
    assert len(got) == len(want) > 10
    for name, delta in want.items():
        assert delta.abs().max() > 0, name                               # the first run did learn this layer
        assert torch.allclose(got[name], delta, atol=1e-6, rtol=1e-4), name


def test_refining_writes_where_it_came_from_and_goes_on_learning(make_cfg, tmp_path):
    from safetensors import safe_open
    from studio.training.trainer import Trainer
    first = Trainer(make_cfg(max_steps=2, learning_rate=1e-2, output_name="first", run_dir=str(tmp_path / "a"))).run()
    again = Trainer(make_cfg(max_steps=2, learning_rate=1e-2, network_weights=str(first.output),
                             output_name="again", run_dir=str(tmp_path / "b"))).run()
    with safe_open(str(again.output), "pt") as f:
        meta = f.metadata()
        assert meta["studio.refined_from"] == "first.safetensors"
        assert "refined from first.safetensors" in meta["ss_training_comment"]
        key = next(k for k in f.keys() if k.endswith("lora_up.weight"))
        moved = f.get_tensor(key)
    with safe_open(str(first.output), "pt") as f:
        assert not torch.equal(f.get_tensor(key), moved)                  # two more steps changed it
    assert again.losses[0] < first.losses[0]                             # it starts from what was learnt


def test_textual_inversion_refines_from_its_embedding(make_cfg, tmp_path):
    from safetensors.torch import load_file
    from studio.training.trainer import Trainer
    ti = dict(method="textual_inversion", token="shpx", init_word="shape", num_vectors=2, learning_rate=5e-2)
    out = Trainer(make_cfg(max_steps=2, output_name="shpx", run_dir=str(tmp_path / "a"), **ti)).run().output
    again = Trainer(make_cfg(network_weights=str(out), output_name="shpx2", run_dir=str(tmp_path / "b"), **ti))
    again._setup()
    rows = again.c.text_encoder.get_input_embeddings().weight[again.net.ti_ids]
    assert torch.equal(rows.detach(), load_file(str(out))["emb_params"])
    wrong = Trainer(make_cfg(network_weights=str(out), output_name="shpx3", run_dir=str(tmp_path / "c"),
                             **{**ti, "num_vectors": 3}))
    with pytest.raises(StudioError, match="has 2 vector") as exc:
        wrong._setup()
    assert exc.value.field == "textual_inversion.num_vectors"


def test_weights_that_do_not_fit_are_refused_naming_the_setting(make_cfg, tmp_path):
    from studio.training.trainer import Trainer
    lora = Trainer(make_cfg(max_steps=1, output_name="l", run_dir=str(tmp_path / "l"),
                            train_text_encoder=True)).run().output
    cases = [({"rank": 8, "train_text_encoder": True}, r"lora_A is \(4, .*\) in the file, \(8, .*\) in this run"),
             ({"method": "loha"}, "is a LoRA file; this run trains a LoHa"),
             ({}, "layer\\(s\\) this run does not train .*lora_te_"),           # the text encoder part
             ]
    for i, (kw, message) in enumerate(cases):
        t = Trainer(make_cfg(network_weights=str(lora), output_name=f"r{i}", run_dir=str(tmp_path / f"r{i}"), **kw))
        with pytest.raises(StudioError, match=message) as exc:
            t._setup()
        assert exc.value.field == "network.network_weights"
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(StudioError, match="not a readable .safetensors LoRA"):
        Trainer(make_cfg(network_weights=str(broken), output_name="b", run_dir=str(tmp_path / "b")))._setup()


def test_the_service_finds_weights_by_name_and_keeps_them_in_the_studios_folders(studio, settings, make_cfg,
                                                                                tmp_path):
    from studio.training.trainer import Trainer
    out = Trainer(make_cfg(max_steps=1, output_name="mine", output_dir=str(settings.lora_path),
                           run_dir=str(tmp_path / "mine"))).run().output
    studio.loras.refresh()
    svc = studio.training
    cfg = svc.complete(make_cfg(network_weights="mine", output_name="mine2", run_dir=""), confined=False)
    assert cfg.network_weights == str(out.resolve())
    with pytest.raises(StudioError, match="No LoRA in models/Lora named 'nope'"):
        svc.complete(make_cfg(network_weights="nope", output_name="x", run_dir=""))
    with pytest.raises(StudioError) as exc:
        svc.complete(make_cfg(network_weights="/etc/passwd", output_name="x", run_dir="", base_model=""),
                     confined=True)
    assert exc.value.field == "network.network_weights"
