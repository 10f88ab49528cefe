"""What a run leaves in models/: file modes that follow the umask, kohya's metadata to the letter, the preview."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_outputs_follow_the_umask(tmp_path, umask):
    from PIL import Image
    from studio.training.atomic import save_image, write_json
    from studio.training.export import save_embedding, save_lora
    old = os.umask(umask)
    try:
        files = [save_lora(tmp_path / "a.safetensors", {"x.lora_down.weight": torch.zeros(2, 2)}, {}),
                 save_embedding(tmp_path / "e.safetensors", torch.zeros(1, 4)),
                 save_image(tmp_path / "p.png", Image.new("RGB", (4, 4))),
                 write_json(tmp_path / "s.json", {"a": 1})]
    finally:
        os.umask(old)
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, (f.name, oct(f.stat().st_mode))
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.fixture(scope="module")
def bucket_run(tmp_path_factory, train_store):
    """Four images in two buckets (two repeats each), six steps of four per epoch, two sample prompts."""
    import shutil
    from studio.training import TrainConfig
    from studio.training.trainer import Trainer
    from tests.training.conftest import write_dataset
    root = tmp_path_factory.mktemp("outputs")
    shutil.copytree(train_store, root / "models")
    ds = write_dataset(root / "bds", 4, sizes=[(64, 64), (64, 64), (64, 128), (128, 64)])
    cfg = TrainConfig(base_model=str(root / "models" / "Stable-diffusion" / "tiny-sd1.safetensors"),
                      dataset_dir=str(ds), resolution=64, bucket_step=32, min_bucket_reso=32, max_bucket_reso=128,
                      min_image_side=32, repeats=2, rank=2, max_steps=6, batch_size=2, seed=1, sample_steps=2,
                      sample_prompts="a circle --w 64 --h 64\na square --w 64 --h 64", sample_every=3,
                      sample_at_start=False, output_name="bk", run_dir=str(root / "run"))
    trainer = Trainer(cfg)
    return trainer, trainer.run()


def test_kohya_metadata_to_the_letter(bucket_run):
    from safetensors import safe_open
    trainer, result = bucket_run
    with safe_open(str(result.output), "pt") as f:
        meta = f.metadata()
    info = json.loads(meta["ss_bucket_info"])               # what A1111's LoRA panel reads
    assert info["buckets"] == {"0": {"resolution": [32, 96], "count": 2}, "2": {"resolution": [64, 64], "count": 6}}
    assert info["mean_img_ar_error"] == pytest.approx((0 + 0 + abs(32 / 96 - 0.5) + abs(1 - 2)) / 4)
    assert meta["ss_num_train_images"] == "8" and meta["ss_num_batches_per_epoch"] == "4"
    # 6 steps at 4 per epoch: the last save counts the partial second epoch, as kohya's does
    assert meta["ss_steps"] == "6" and meta["ss_epoch"] == "2" and meta["ss_num_epochs"] == "2"
    assert meta["ss_max_train_steps"] == "6"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.01)"
    assert "ss_network_args" not in meta                     # kohya: only when there are network arguments
    assert meta["ss_enable_bucket"] == "True" and meta["ss_min_bucket_reso"] == "32"
    assert meta["ss_max_bucket_reso"] == "128" and meta["ss_batch_size_per_device"] == "2"
    assert meta["ss_total_batch_size"] == "2" and meta["ss_gradient_accumulation_steps"] == "1"
    assert meta["ss_cache_latents"] == "True" and meta["ss_flip_aug"] == "False"
    assert meta["ss_num_reg_images"] == "0" and json.loads(meta["ss_reg_dataset_dirs"]) == {}
    assert meta["ss_session_id"].isdigit() and meta["ss_lr_warmup_steps"] == "0"
    assert all(isinstance(v, str) for v in meta.values())


def test_preview_is_the_last_sample_and_a_users_preview_stays(bucket_run, tmp_path):
    from studio.training.export import save_preview
    trainer, result = bucket_run
    preview = result.output.with_name("bk.preview.png")
    assert preview.is_file()
    assert preview.read_bytes() == (trainer.run_dir / "samples" / "step000006_00.png").read_bytes()
    mine = tmp_path / "Lora" / "x.safetensors"
    mine.parent.mkdir()
    own = mine.with_name("x.preview.png")
    own.write_bytes(b"my own picture")
    assert save_preview(mine, result.samples) is None and own.read_bytes() == b"my own picture"
    assert save_preview(tmp_path / "Lora" / "y.safetensors", []) is None
    assert not (tmp_path / "Lora" / "y.preview.png").exists()


def test_embedding_trigger_is_its_file_name(make_cfg):
    from safetensors import safe_open
    from studio.training.trainer import Trainer
    cfg = make_cfg(method="textual_inversion", token="tok", init_word="shape", max_steps=1, output_name="my-emb",
                   sample_prompts="a tok --w 64 --h 64 --s 2", sample_every=1, sample_at_start=False)
    result = Trainer(cfg).run()
    with safe_open(str(result.output), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.trigger_phrase"] == "my-emb"      # A1111: the prompt word is the file name
    assert meta["modelspec.title"] == "my-emb"
    assert result.output.with_name("my-emb.preview.png").is_file()
