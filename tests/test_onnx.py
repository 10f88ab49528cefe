"""ONNX export and the onnxruntime path (studio/onnx): the export matches torch, txt2img on it is close to torch's,
the cases it cannot take run on torch with a warning, and the REST route and the Settings button export."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from studio.request import GenerationRequest  # noqa: E402


@pytest.fixture(scope="module")
def exported(model_store, tmp_path_factory):
    """A studio over a copy of the tiny store with tiny-sd1 exported once (an export takes ~20 s here)."""
    from studio.app import Studio
    from studio.onnx.export import export_checkpoint
    from studio.settings import Settings

    root = tmp_path_factory.mktemp("onnx")
    shutil.copytree(model_store, root / "models")
    studio = Studio(Settings(models_dir=str(root / "models"), data_dir=str(root / "data"),
                             outdir=str(root / "out"), default_checkpoint="tiny-sd1.safetensors", preview_every=0,
                             save_images=False), load_extensions=False)
    outcome = export_checkpoint(studio, "tiny-sd1.safetensors")
    yield studio, outcome
    studio.close()


def _req(**kw) -> GenerationRequest:
    base = dict(prompt="a red circle", negative_prompt="blurry", steps=4, width=64, height=64, seed=7,
                sampler_name="DPM++ 2M", scheduler="Karras", save_images=False, checkpoint="tiny-sd1.safetensors")
    return GenerationRequest(**{**base, **kw})


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) for im in result.images])


@pytest.fixture()
def onnx_on(exported):
    studio, _ = exported
    studio.settings.onnx_runtime = True
    yield studio
    studio.settings.onnx_runtime = False
    studio.settings.deepcache_interval = 1


def test_export_writes_every_part_and_its_manifest(exported):
    studio, out = exported
    assert out.folder.parent == Path(studio.settings.onnx_path)
    assert out.folder.name.startswith("tiny-sd1-")
    for part in ("unet", "vae_decoder", "vae_encoder", "text_encoder"):
        assert out.files[f"{part}/model.onnx"] > 0 and (out.folder / part / "model.onnx").is_file()
        assert out.max_error[part] < 1e-4
    manifest = json.loads((out.folder / "studio_onnx.json").read_text())
    info = studio.registry.find_checkpoint("tiny-sd1.safetensors")
    assert manifest["sha256"] == studio.registry.ensure_hash(info) and manifest["opset"] == 18
    assert manifest["parts"]["unet"]["inputs"] == ["sample", "timestep", "encoder_hidden_states"]
    assert out.total_bytes == sum(p.stat().st_size for p in out.folder.rglob("*") if p.is_file())
    assert not [p for p in out.folder.parent.iterdir() if p.name.startswith(".")]   # nothing half-written left


def test_onnx_unet_equals_torch_at_other_sizes(exported):
    """Dynamic axes: batch 3, a non-square latent and a two-chunk prompt (154 tokens), fractional timesteps."""
    import onnxruntime as ort

    studio, out = exported
    session = ort.InferenceSession(str(out.folder / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 12, 8, generator=g), torch.tensor([981.5, 500.25, 3.0])
    e = torch.randn(3, 154, 32, generator=g)
    got = session.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": e.numpy()})[0]
    with studio.manager.acquire("tiny-sd1.safetensors") as loaded, torch.no_grad():
        ref = loaded.components.unet(x, t, e).sample
    assert np.abs(got - ref.numpy()).max() < 1e-4 * max(1.0, float(ref.abs().max()))


def test_txt2img_on_onnx_is_close_to_torch(onnx_on):
    studio = onnx_on
    studio.settings.onnx_runtime = False
    ref = studio.generate(_req(batch_size=2))
    studio.settings.onnx_runtime = True
    got = studio.generate(_req(batch_size=2))
    assert got.warnings == [] and "ONNX: CPU" in got.infotexts[0] and "ONNX" not in ref.infotexts[0]
    diff = np.abs(_pixels(got) - _pixels(ref))
    assert diff.mean() < 0.5 and diff.max() <= 8          # 0-255 scale: rounding, not a different picture
    with studio.manager.acquire("tiny-sd1.safetensors") as loaded:       # the torch modules are back as they were
        assert "forward" not in loaded.components.unet.__dict__ and "decode" not in loaded.vae.__dict__
    assert any(e["label"] == "ONNX tiny-sd1.safetensors" for e in studio.manager.stats()["entries"])


def test_hires_and_img2img_run_on_the_export(onnx_on):
    studio = onnx_on
    hires = studio.generate(_req(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", hr_denoising_strength=0.5))
    assert hires.warnings == [] and "ONNX: CPU" in hires.infotexts[0] and hires.images[0].size == (96, 96)
    from PIL import Image
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    img = studio.generate(_req(mode="img2img", init_images=(init,), denoising_strength=0.6))
    studio.settings.onnx_runtime = False
    ref = studio.generate(_req(mode="img2img", init_images=(init,), denoising_strength=0.6))
    assert "ONNX: CPU" in img.infotexts[0] and np.abs(_pixels(img) - _pixels(ref)).mean() < 0.5


def test_without_an_export_the_job_runs_on_torch_and_says_how_to_export(onnx_on):
    studio = onnx_on
    got = studio.generate(_req(checkpoint="tiny-sd1-b.safetensors"))
    studio.settings.onnx_runtime = False
    ref = studio.generate(_req(checkpoint="tiny-sd1-b.safetensors"))
    assert any("has no ONNX export" in w and "POST /sdapi/v1/export/onnx" in w for w in got.warnings)
    assert "ONNX" not in got.infotexts[0] and np.array_equal(_pixels(got), _pixels(ref))


def test_lora_prompt_and_deepcache_fall_back_to_torch_with_a_warning(onnx_on, exported):
    from safetensors.torch import save_file

    from tests import lorafiles, tinymodels
    studio = onnx_on
    tensors, _ = lorafiles.kohya_lora(tinymodels.make_tiny("sd1", seed=0), seed=1, conv=False)
    lora_dir = Path(studio.settings.lora_path)
    lora_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(lora_dir / "tinylora.safetensors"))
    studio.loras.refresh()
    got = studio.generate(_req(prompt="a red circle <lora:tinylora:1>"))
    assert any("ONNX runtime not used" in w and "<lora:tinylora>" in w for w in got.warnings)
    assert "ONNX" not in got.infotexts[0] and "Lora hashes" in got.infotexts[0]
    studio.settings.deepcache_interval = 2
    got = studio.generate(_req())
    assert any("ONNX runtime not used" in w and "DeepCache" in w for w in got.warnings)
    assert "ONNX" not in got.infotexts[0] and "DeepCache: 2" in got.infotexts[0]


def test_sdxl_exports_with_its_time_inputs_and_generates(onnx_on):
    from studio.onnx.export import export_checkpoint
    studio = onnx_on
    out = export_checkpoint(studio, "tiny-sdxl.safetensors")
    manifest = json.loads((out.folder / "studio_onnx.json").read_text())
    assert manifest["parts"]["unet"]["inputs"][3:] == ["text_embeds", "time_ids"]
    assert "text_encoder_2/model.onnx" in out.files
    got = studio.generate(_req(checkpoint="tiny-sdxl.safetensors"))
    studio.settings.onnx_runtime = False
    ref = studio.generate(_req(checkpoint="tiny-sdxl.safetensors"))
    assert got.warnings == [] and "ONNX: CPU" in got.infotexts[0]
    assert np.abs(_pixels(got) - _pixels(ref)).mean() < 0.5


def test_unsupported_denoiser_is_named():
    from types import SimpleNamespace

    from studio.onnx.export import unsupported
    comps = SimpleNamespace(unet=torch.nn.Linear(2, 2), spec=SimpleNamespace(label="FLUX.1"))
    assert "FLUX.1 checkpoints have no ONNX path" in unsupported(comps)


def test_providers_prefer_tensorrt_and_cuda_on_a_cuda_device():
    from studio.onnx.runtime import providers
    every = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers(torch.device("cpu"), every) == ["CPUExecutionProvider"]
    got = providers(torch.device("cuda", 1), every)
    assert [p[0] for p in got[:2]] == every[:2] and got[0][1] == {"device_id": 1} and got[2] == every[2]
    assert providers(torch.device("cuda"), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_rest_route_exports_and_refuses_an_unknown_checkpoint(exported):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from studio.api import build_router
    studio, _ = exported
    app = FastAPI()
    app.include_router(build_router(studio))
    with TestClient(app) as client:
        bad = client.post("/sdapi/v1/export/onnx", json={"checkpoint": "no-such-model"})
        assert bad.status_code == 404 and "no-such-model" in bad.json()["detail"]
        extra = client.post("/sdapi/v1/export/onnx", json={"checkpoint": "x", "dtype": "fp16"})
        assert extra.status_code == 422 and extra.json()["field"] == "dtype"
        ok = client.post("/sdapi/v1/export/onnx", json={"checkpoint": "tiny-sd1-b"})
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert body["checkpoint"].startswith("tiny-sd1-b.safetensors [") and body["files"]["unet/model.onnx"] > 0
        assert Path(body["folder"]).is_dir() and body["total_bytes"] == sum(body["files"].values())


def test_missing_onnxruntime_is_a_422_naming_the_packages(exported, monkeypatch):
    import sys

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from studio.api import build_router
    monkeypatch.setitem(sys.modules, "onnxruntime", None)          # import onnxruntime raises ImportError
    app = FastAPI()
    app.include_router(build_router(exported[0]))
    with TestClient(app) as client:
        got = client.post("/sdapi/v1/export/onnx", json={})
    assert got.status_code == 422 and "onnxruntime" in got.json()["detail"]
    assert "requirements.txt" in got.json()["detail"]


def test_settings_button_exports_the_current_checkpoint(exported):
    pytest.importorskip("gradio")
    from tabs.settings import export_onnx
    studio, _ = exported
    studio.switch_checkpoint("tiny-sd1.safetensors")
    html = export_onnx(studio)
    assert "Exported tiny-sd1.safetensors [" in html and "MB" in html
    studio.switch_checkpoint("tiny-sd2.safetensors")
    assert "studio-note" in export_onnx(studio)                     # SD 2.x is a UNet family too


def test_onnx_flag_and_setting():
    from studio import cli
    from studio.settings import Settings
    assert cli.settings_overrides(cli.build_parser().parse_args(["--onnx"]))["onnx_runtime"] is True
    assert "onnx_runtime" not in cli.settings_overrides(cli.build_parser().parse_args([]))
    s, warnings = Settings.from_dict({"onnx_runtime": True, "models_dir": "/m"})
    assert s.onnx_runtime and warnings == [] and s.onnx_path == Path("/m/onnx") and not Settings().onnx_runtime
