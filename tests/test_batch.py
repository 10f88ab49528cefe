"""img2img batch (studio/batch.py): one job per file, outputs by name, masks by name, PNG info, skips."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from studio.batch import find_mask, run_img2img_batch
from studio.errors import StudioError
from studio.infotext import read_infotext
from studio.request import GenerationRequest

BASE = GenerationRequest(mode="img2img", prompt="a stone", width=64, height=64, steps=2, seed=7,
                         sampler_name="Euler", denoising_strength=0.9, mask_blur=0)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from studio.app import Studio
    from studio.settings import Settings
    from tests import tinymodels
    root = tmp_path_factory.mktemp("batch")
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    tinymodels.write_single_file(tinymodels.make_tiny("sd1", seed=0),
                                 root / "models" / "Stable-diffusion" / "tiny.safetensors")
    s = Studio(Settings(models_dir=str(root / "models"), data_dir=str(root / "data"), outdir=str(root / "out"),
                        default_checkpoint="tiny.safetensors", preview_every=0))
    yield s
    s.close()


def picture(colour=(40, 120, 200), size=(64, 64)) -> Image.Image:
    img = Image.new("RGB", size, colour)
    ImageDraw.Draw(img).rectangle((8, 8, 30, 30), fill=(230, 200, 20))
    return img


def test_folder_in_folder_out_with_skips(studio, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    picture().save(src / "b.png")
    picture((200, 30, 60)).save(src / "a.jpg")
    (src / "notes.txt").write_text("not an image")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (src / ".hidden.png").write_bytes(b"")
    seen = []
    report = run_img2img_batch(studio, BASE, src, out, progress=lambda i, n, name, job: seen.append((i, n, name)))
    assert [item.source.rsplit("/", 1)[-1] for item in report.done] == ["a.jpg", "b.png"]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]      # no temp files left behind
    assert {name for name, _ in report.skipped} == {"notes.txt", "broken.png"}
    assert all("not an image" in why for _, why in report.skipped)
    assert not report.failed and not report.interrupted
    text = read_infotext(out / "a.png")
    assert text.startswith("a stone") and "Denoising strength: 0.9" in text and "Seed: 7" in text
    assert Image.open(out / "a.png").size == (64, 64)
    assert {n for _, n, _ in seen} == {4}
    assert "2 file(s) processed" in report.summary() and "notes.txt" in report.summary()
    # the engine's own output folder gets nothing: batch outputs go only to output_dir
    from pathlib import Path
    assert not list(Path(studio.settings.outdir).glob("**/*.png"))


def test_files_list_masks_by_name_and_several_images_per_file(studio, tmp_path):
    files = tmp_path / "files"
    masks, out = tmp_path / "masks", tmp_path / "out"
    files.mkdir()
    masks.mkdir()
    picture().save(files / "masked.png")
    picture().save(files / "plain.png")
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((40, 40, 63, 63), fill=255)
    mask.save(masks / "masked.webp", lossless=True)
    assert find_mask(masks, files / "masked.png") == masks / "masked.webp"
    report = run_img2img_batch(studio, BASE.replace(batch_size=2), [files / "masked.png", files / "plain.png"],
                               out, mask_dir=masks)
    assert sorted(p.name for p in out.iterdir()) == ["masked-2.png", "masked.png", "plain-2.png", "plain.png"]
    masked = next(i for i in report.done if i.source.endswith("masked.png"))
    assert masked.mask and masked.mask.endswith("masked.webp")
    # inpaint with blur 0: outside the mask the pixels are the input's, exactly
    result = np.asarray(Image.open(out / "masked.png").convert("RGB"), dtype=np.int16)
    source = np.asarray(picture(), dtype=np.int16)
    assert np.array_equal(result[:40, :40], source[:40, :40])
    assert np.abs(result[44:, 44:] - source[44:, 44:]).max() > 0
    assert "Mask blur: 0" in read_infotext(out / "masked.png")
    assert "Mask blur" not in read_infotext(out / "plain.png")   # no mask for this one: plain img2img


def test_png_info_parameters_are_merged_over_the_base(studio, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    info = PngInfo()
    info.add_text("parameters", "a red roof\nNegative prompt: fog\nSteps: 3, Sampler: Euler a, CFG scale: 5, "
                                "Seed: 99, Size: 512x512, Model: other")
    picture().save(src / "with.png", pnginfo=info)
    picture().save(src / "without.png")
    report = run_img2img_batch(studio, BASE, src, out, use_png_info=True, scale_by=0.5)
    with_text = read_infotext(out / "with.png")
    assert with_text.startswith("a stone a red roof\nNegative prompt: fog")
    assert "Steps: 3" in with_text and "Sampler: Euler a" in with_text and "Seed: 99" in with_text
    assert "CFG scale: 5" in with_text
    assert Image.open(out / "with.png").size == (64, 64)     # size is not taken from PNG info; 64*0.5 -> min 64
    assert "Seed: 7" in read_infotext(out / "without.png")
    without = next(i for i in report.done if i.source.endswith("without.png"))
    assert any("no PNG info" in w for w in without.warnings)


def test_bad_folders_and_bad_requests_are_reported(studio, tmp_path):
    with pytest.raises(StudioError) as err:
        run_img2img_batch(studio, BASE, tmp_path / "nope", tmp_path / "out")
    assert err.value.field == "input_dir"
    (tmp_path / "in").mkdir()
    picture().save(tmp_path / "in" / "x.png")
    with pytest.raises(StudioError) as err:
        run_img2img_batch(studio, BASE, tmp_path / "in", tmp_path / "out", mask_dir=tmp_path / "nomasks")
    assert err.value.field == "mask_dir"
    with pytest.raises(StudioError):
        run_img2img_batch(studio, BASE, tmp_path / "in", "")
    report = run_img2img_batch(studio, BASE.replace(steps=0), tmp_path / "in", tmp_path / "out")
    assert report.failed and "steps" in report.failed[0][1] and not report.done


def test_interrupt_ends_the_batch(studio, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("1.png", "2.png", "3.png"):
        picture().save(src / name)

    def stop_first(i, n, name, job):
        if job is not None:
            job.interrupt()

    report = run_img2img_batch(studio, BASE.replace(steps=50), src, tmp_path / "out", progress=stop_first)
    assert report.interrupted and len(report.done) <= 1
    assert "Interrupted" in report.summary()
