"""Dataset import, scan, buckets, caption tools, config and prompt parsing (no training)."""
from __future__ import annotations

import zipfile

import pytest

from studio.errors import StudioError
from studio.training import TrainConfig
from studio.training.buckets import epoch_batches, make_buckets, plan_buckets
from studio.training.captions import (BlipCaptioner, bulk_edit, edit_caption, tag_frequency, training_caption)
from studio.training.dataset import import_into, import_zip, scan_dataset
from studio.training.sampling import read_prompts
from tests.training.conftest import make_shape, write_dataset


def test_zip_slip_refused_and_nothing_written_outside(tmp_path):
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("../escape.png", b"x")
        zf.writestr("/abs/escape.png", b"x")
        zf.writestr("sub/../../escape2.png", b"x")
        zf.writestr("ok/good.txt", "a caption")
        zf.writestr("notes.exe", b"x")
    dest = tmp_path / "data" / "ds"
    report = import_zip(z, dest)
    refused = dict(report.refused)
    assert "../escape.png" in refused and "/abs/escape.png" in refused and "sub/../../escape2.png" in refused
    assert "notes.exe" in refused
    assert report.added == [str((dest / "ok" / "good.txt").resolve())]
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {"evil.zip", "data/ds/ok/good.txt"}


def test_zip_bomb_limited(tmp_path):
    z = tmp_path / "big.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.png", b"\0" * 200_000)
    with pytest.raises(StudioError, match="more than"):
        import_zip(z, tmp_path / "ds", max_bytes=100_000)


def test_scan_repeats_captions_and_skips(tmp_path):
    root = write_dataset(tmp_path / "ds", 2)
    sub = write_dataset(root / "3_extra", 1)
    make_shape("circle", (1, 2, 3)).save(sub / "cap.png")
    (sub / "cap.caption").write_text("from caption file")
    make_shape("square", (9, 9, 9), size=(20, 20)).save(root / "tiny.png")
    (root / "broken.png").write_bytes(b"not a png")
    (root / "readme.md").write_text("hi")
    scan = scan_dataset(root, min_side=32, repeats=2)
    names = {i.path.name: i for i in scan.items}
    assert set(names) == {"img0.png", "img1.png", "cap.png"}
    assert names["img1.png"].repeats == 2 and names["cap.png"].repeats == 3
    assert names["cap.png"].caption == "from caption file"
    reasons = {p.split("/")[-1]: r for p, r in scan.skipped}
    assert "too small" in reasons["tiny.png"] and "corrupt" in reasons["broken.png"]
    assert reasons["readme.md"] == "not an image"
    assert scan.dirs["3_extra"] == {"n_repeats": 3, "img_count": 2}
    assert scan.num_images == 2 * 2 + 2 * 3


def test_import_dropped_files_and_folder(tmp_path):
    src = write_dataset(tmp_path / "src", 2)
    (src / "x.exe").write_bytes(b"1")
    r = import_into([src / "img0.png", src / "img0.txt", src / "x.exe"], tmp_path / "ds1")
    assert len(r.added) == 2 and r.refused[0][1] == "not an image or caption file"
    r = import_into(src, tmp_path / "ds2")
    assert sorted(p.split("/")[-1] for p in r.added) == ["img0.png", "img0.txt", "img1.png", "img1.txt"]


def test_buckets_and_report(tmp_path):
    b = make_buckets(128, 64, 256, 64)
    assert (128, 128) in b and (192, 64) in b and (64, 192) in b
    assert all(w * h <= 128 * 128 and w % 64 == 0 and h % 64 == 0 for w, h in b)
    root = write_dataset(tmp_path / "ds", 3, sizes=[(64, 64), (192, 64), (64, 192)])
    items = scan_dataset(root, min_side=32).items
    plan = plan_buckets(items, resolution=128, min_reso=64, max_reso=256)
    assert plan.report(items) == {"128x128": ["img0.png"], "192x64": ["img1.png"], "64x192": ["img2.png"]}
    crop = plan_buckets(items, resolution=64, enable=False)
    assert crop.report(items) == {"64x64": ["img0.png", "img1.png", "img2.png"]}
    batches = epoch_batches(plan.sizes, [2, 2, 2], 2, seed=1, epoch=0)
    assert all(len({plan.sizes[i] for i in bt}) == 1 for bt in batches)   # one bucket per batch
    assert epoch_batches(plan.sizes, [2, 2, 2], 2, 1, 0) == batches != epoch_batches(plan.sizes, [2, 2, 2], 2, 1, 5)


def test_caption_tools(tmp_path):
    assert edit_caption("a dog, grass", trigger="sks", suffix="photo") == "sks, a dog, grass, photo"
    assert edit_caption("sks, a dog", trigger="sks") == "sks, a dog"
    assert edit_caption("a cat on a mat", find="cat", replace="dog") == "a dog on a mat"
    items = scan_dataset(write_dataset(tmp_path / "ds", 2), min_side=32).items
    bulk_edit(items, trigger="trg", prefix="best")
    assert (tmp_path / "ds" / "img0.txt").read_text().strip() == "trg, best, shp, a circle, plain background"
    freq = tag_frequency(items)["ds"]
    assert freq["trg"] == 2 and freq["a circle"] == 1
    import random
    out = training_caption("a, b, c, d, e", random.Random(0), shuffle=True, keep_tokens=2, dropout=0)
    assert out.startswith("a, b, ") and sorted(out.split(", ")) == ["a", "b", "c", "d", "e"]
    assert training_caption("a", random.Random(0), shuffle=False, keep_tokens=0, dropout=0.999) == ""


def test_config_toml_roundtrip_and_errors(tmp_path):
    cfg = TrainConfig(base_model="m.safetensors", dataset_dir="ds", sample_prompts='a "q"\\ --w 64\nb', rank=16)
    path = cfg.save(tmp_path / "run.toml")
    assert "[network]" in path.read_text()
    assert TrainConfig.load(path) == cfg
    with pytest.raises(StudioError) as e:
        TrainConfig(method="dora").validate(check_files=False)
    assert e.value.field == "method.method"
    with pytest.raises(StudioError) as e:
        TrainConfig(optimizer="AdamW8bit").validate(check_files=False)
    assert e.value.field == "optimizer.optimizer"
    with pytest.raises(StudioError) as e:
        TrainConfig(method="textual_inversion", token="two words").validate(check_files=False)
    assert e.value.field == "textual_inversion.token"
    with pytest.raises(StudioError) as e:
        TrainConfig().validate()
    assert e.value.field == "model.base_model"
    with pytest.raises(StudioError) as e:
        TrainConfig.from_dict({"network": {"rank": "8"}})
    assert e.value.field == "network.rank"


def test_sample_prompt_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# comment\na shp circle --n blurry --w 96 --h 64 --d 5 --l 4.5 --s 3\n\nplain\n")
    a, b = read_prompts(str(f), width=64, height=64, steps=2)
    assert (a.prompt, a.negative, a.width, a.height, a.seed, a.cfg, a.steps) == ("a shp circle", "blurry", 96, 64,
                                                                                 5, 4.5, 3)
    assert (b.prompt, b.width, b.steps) == ("plain", 64, 2)


def test_blip_missing_model_names_folder(tmp_path):
    with pytest.raises(StudioError) as e:
        BlipCaptioner(tmp_path / "models" / "captioners" / "blip-image-captioning-base")
    assert "captioners/blip-image-captioning-base" in str(e.value)


def test_blip_tiny_random_model_captions(tmp_path):
    from tests.tinymodels import write_tiny_blip

    folder = tmp_path / "captioners" / "tiny-blip"
    write_tiny_blip(folder, tmp_path, say=None)
    items = scan_dataset(write_dataset(tmp_path / "ds", 2, captions=False), min_side=32).items
    BlipCaptioner(folder, max_new_tokens=5).caption_items(items, trigger="trg")
    text = (tmp_path / "ds" / "img0.txt").read_text().strip()
    assert text.startswith("trg")
