"""studio.loading: tokenizer, family detection, single-file / folder loads (bit-exact), bad inputs."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from studio.errors import ModelLoadError  # noqa: E402
from studio.loading.diffusers_folder import load_diffusers_folder  # noqa: E402
from studio.loading.hub import load_hub_repo  # noqa: E402
from studio import families  # noqa: E402
from studio.loading.ldm_config import shapes_of  # noqa: E402


def detect_family(shapes, path=""):
    return families.detect_ldm(shapes, path).name
from studio.loading.single_file import load_single_file, load_vae_file  # noqa: E402
from studio.loading.state_dict import read_header_shapes, read_state_dict  # noqa: E402
from studio.loading.tokenizers import load_clip_tokenizer  # noqa: E402
from tests.tinymodels import make_pipeline, make_tiny, write_diffusers_folder, write_single_file  # noqa: E402

FAMILIES = ["sd1", "sd2", "sdxl", "sdxl_refiner"]
PARTS = ["unet", "vae", "text_encoder", "text_encoder_2"]


@pytest.fixture(scope="module")
def tiny():
    return {f: make_tiny(f, seed=3) for f in FAMILIES}


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {f: write_single_file(c, d / f"{f}.safetensors") for f, c in tiny.items()}


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("folders")
    return {f: write_diffusers_folder(c, d / f) for f, c in tiny.items()}


def assert_same_weights(a, b):
    for name in PARTS:
        ma, mb = getattr(a, name), getattr(b, name)
        assert (ma is None) == (mb is None), name
        if ma is None:
            continue
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{name}.{k}"


def test_tokenizer_ids():
    ids = load_clip_tokenizer()("a photo of an astronaut riding a horse").input_ids
    assert ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]
    tok = load_clip_tokenizer(pad_token="!")
    assert tok.pad_token_id == 0 and tok.model_max_length == 77 and len(tok) == 49408
    padded = tok("hi", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[3:] == [0] * 74


def test_tokenizer_matches_open_clip():
    import open_clip
    ref = open_clip.get_tokenizer("ViT-L-14")
    tok = load_clip_tokenizer()
    for text in ["A Cat, sitting!! on 3 mats", "héllo wörld 日本", "masterpiece, (best quality:1.2)"]:
        want = [t for t in ref([text])[0].tolist() if t != 0]
        assert tok(text).input_ids == want, text


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_bit_exact(tiny, files, family):
    c = load_single_file(files[family])
    assert c.family == family and c.prediction_type == "epsilon" and c.in_channels == 4
    assert_same_weights(tiny[family], c)
    assert dict(c.unet.config)["cross_attention_dim"] == tiny[family].unet.config.cross_attention_dim
    assert (c.tokenizer is None) == (family == "sdxl_refiner")
    if c.tokenizer_2 is not None:
        assert c.tokenizer_2.pad_token == "!"
    if family == "sd2":
        assert c.tokenizer.pad_token == "!"
        # the file holds one more OpenCLIP block than diffusers' SD2 text encoder (penultimate layer)
        n = tiny["sd2"].text_encoder.config.num_hidden_layers
        assert f"cond_stage_model.model.transformer.resblocks.{n}.ln_1.weight" in read_header_shapes(files[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_family_detection_from_header(files, family):
    assert detect_family(read_header_shapes(files[family]), files[family]) == family


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_bit_exact(tiny, folders, family):
    c = load_diffusers_folder(folders[family])
    assert c.family == family
    assert_same_weights(tiny[family], c)


def test_single_file_and_folder_same_pixels(files, folders):
    outs = []
    for comps in (load_single_file(files["sd1"]), load_diffusers_folder(folders["sd1"])):
        pipe = make_pipeline(comps)
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                   generator=torch.Generator().manual_seed(42)).images
        outs.append(out)
    assert outs[0].shape == (1, 64, 64, 3) and np.isfinite(outs[0]).all()
    np.testing.assert_array_equal(outs[0], outs[1])


def test_sdxl_single_file_runs(files):
    pipe = make_pipeline(load_single_file(files["sdxl"]))
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(1)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_sidecar_yaml_v_prediction(tiny, tmp_path):
    path = write_single_file(tiny["sd2"], tmp_path / "v_model.safetensors")
    (tmp_path / "v_model.yaml").write_text(
        "model:\n  params:\n    parameterization: \"v\"\n    unet_config:\n      params:\n"
        "        num_head_channels: 32\n")
    c = load_single_file(path)
    assert c.prediction_type == "v_prediction" and c.scheduler_config["prediction_type"] == "v_prediction"
    assert list(c.unet.config.attention_head_dim) == [1, 2]  # 32 / 32, 64 / 32
    assert any("v_model.yaml" in n for n in c.notes)
    assert load_single_file(path, prediction="epsilon").prediction_type == "epsilon"  # explicit wins


def test_inpaint_9_channels(tmp_path):
    c = make_tiny("sd1", seed=1, in_channels=9)
    loaded = load_single_file(write_single_file(c, tmp_path / "inp.safetensors"))
    assert loaded.in_channels == 9 and loaded.is_inpaint and loaded.unet.config.in_channels == 9
    assert any("inpainting" in n for n in loaded.notes)


def test_ckpt_with_state_dict_wrapper(tiny, files, tmp_path):
    sd = read_state_dict(files["sd1"])
    path = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": sd, "global_step": 10}, path)
    assert_same_weights(tiny["sd1"], load_single_file(path))


def test_fp16_load(files):
    c = load_single_file(files["sd1"], dtype=torch.float16)
    assert next(c.unet.parameters()).dtype == torch.float16
    assert next(c.text_encoder.parameters()).dtype == torch.float16


def _raises(path, *words, loader=load_single_file):
    with pytest.raises(ModelLoadError) as info:
        loader(path)
    msg = str(info.value)
    assert os.path.basename(str(path)) in msg and "Fix:" in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    return msg


def test_missing_file(tmp_path):
    _raises(tmp_path / "nope.safetensors", "not found")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    _raises(p, "empty")


def test_truncated_safetensors(files, tmp_path):
    data = open(files["sd1"], "rb").read()
    p = tmp_path / "trunc.safetensors"
    p.write_bytes(data[: len(data) // 2])
    _raises(p, "truncated")
    p2 = tmp_path / "garbage.safetensors"
    p2.write_bytes(os.urandom(4096))
    _raises(p2, "safetensors")


def test_random_bytes_ckpt(tmp_path):
    p = tmp_path / "random.ckpt"
    p.write_bytes(os.urandom(4096))
    _raises(p, "not a readable checkpoint")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_pickle_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil(str(marker))}, p)
    assert not marker.exists()
    _raises(p, "refused", "needs code")
    assert not marker.exists()
    legacy = tmp_path / "evil_legacy.pt"  # plain (non-zip) pickle as well
    legacy.write_bytes(pickle.dumps(_Evil(str(marker))))
    _raises(legacy, "refused")
    assert not marker.exists()


def test_lora_file_rejected(tmp_path):
    from safetensors.torch import save_file
    p = tmp_path / "my_lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, str(p))
    _raises(p, "LoRA", "models/Lora")


def test_vae_file(tiny, files, tmp_path):
    from safetensors.torch import save_file
    sd = read_state_dict(files["sd1"])
    vae_sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    ldm = tmp_path / "vae-ft.safetensors"
    save_file(vae_sd, str(ldm))
    _raises(ldm, "VAE", "models/VAE")  # not a checkpoint
    ref = tiny["sd1"].vae.state_dict()
    for vae in (load_vae_file(ldm), load_vae_file(files["sd1"])):
        assert all(torch.equal(ref[k], v) for k, v in vae.state_dict().items())
    diff = tmp_path / "diffusers_vae.safetensors"
    save_file({k: v.contiguous() for k, v in ref.items()}, str(diff))
    vae = load_vae_file(diff, family="sdxl")
    assert vae.config.scaling_factor == 0.13025
    assert all(torch.equal(ref[k], v) for k, v in vae.state_dict().items())
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_te_x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    _raises(lora, "LoRA", loader=load_vae_file)


def test_inconsistent_widths(files, tmp_path):
    from safetensors.torch import save_file
    sd = read_state_dict(files["sd1"])
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    sd[key] = torch.zeros(49408, 48)
    p = tmp_path / "bad_merge.safetensors"
    save_file(sd, str(p))
    _raises(p, "width")


def test_shapes_detection_is_layout_first(files):
    shapes = shapes_of(read_state_dict(files["sd2"]))
    # tiny widths are not 1024, yet the OpenCLIP layout says SD2
    assert detect_family(shapes) == "sd2"


def test_hub_repo_offline_message(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load_hub_repo("nobody/not-a-cached-model", allow_download=False, cache_dir=str(tmp_path))
    msg = str(info.value)
    assert "nobody/not-a-cached-model" in msg and "not in the Hugging Face cache" in msg
    assert "allow_download" in msg


def test_folder_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_diffusers_folder(tmp_path)


REAL = {  # the published diffusers configs of the real models (the parts that shape the network)
    "sd1": dict(unet=dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                          attention_head_dim=8,
                          down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                          up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
                te=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        hidden_act="quick_gelu"), vae=[128, 256, 512, 512]),
    "sd2": dict(unet=dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=1024,
                          attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                          down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                          up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
                te=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                        hidden_act="gelu"), vae=[128, 256, 512, 512]),
    "sdxl": dict(unet=dict(block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
                           attention_head_dim=[5, 10, 20], use_linear_projection=True,
                           transformer_layers_per_block=[1, 2, 10], addition_embed_type="text_time",
                           addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                           down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                           up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
                 te=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         hidden_act="quick_gelu"),
                 te2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                          hidden_act="gelu", projection_dim=1280), vae=[128, 256, 512, 512]),
}


@pytest.mark.parametrize("family", list(REAL))
def test_real_sized_configs_from_shapes(family):
    """Export real-sized models built on the meta device, then read the configs back off the shapes."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.loading.components import Components
    from studio.loading.ldm_config import clip_config, open_clip_config, unet_config, vae_config
    from studio.loading.ldm_export import components_to_ldm

    spec = REAL[family]
    with init_empty_weights():
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(block_out_channels=spec["vae"], layers_per_block=2, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
        te = CLIPTextModel(CLIPTextConfig(**spec["te"]))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**spec["te2"])) if "te2" in spec else None
    comps = Components(family=family, unet=unet, vae=vae, text_encoder=te, tokenizer=None, scheduler_config={},
                       text_encoder_2=te2)
    shapes = shapes_of(components_to_ldm(comps))
    assert detect_family(shapes) == family
    cfg = unet_config(shapes, families.get(family), text_proj_dim=1280 if te2 else None)
    for k, v in spec["unet"].items():
        if k == "transformer_layers_per_block":
            assert cfg[k] == v
        else:
            assert (list(cfg[k]) if isinstance(v, list) else cfg[k]) == v, k
    assert vae_config(shapes, families.get(family))["block_out_channels"] == spec["vae"]
    te_cfg = (clip_config(shapes, "cond_stage_model.transformer.text_model.") if family == "sd1" else
              open_clip_config(shapes, "cond_stage_model.model.", drop_last=True) if family == "sd2" else
              clip_config(shapes, "conditioner.embedders.0.transformer.text_model."))
    assert {k: te_cfg[k] for k in spec["te"]} == spec["te"]
    if te2 is not None:
        cfg2 = open_clip_config(shapes, "conditioner.embedders.1.model.", drop_last=False)
        assert {k: cfg2[k] for k in spec["te2"]} == spec["te2"]


def test_old_clip_key_names(tiny, files, tmp_path):
    from safetensors.torch import save_file
    old = "cond_stage_model.transformer."
    sd = {(old + k[len(old + "text_model."):] if k.startswith(old) else k): v
          for k, v in read_state_dict(files["sd1"]).items()}
    p = tmp_path / "old_names.safetensors"
    save_file(sd, str(p))
    assert_same_weights(tiny["sd1"], load_single_file(p))
