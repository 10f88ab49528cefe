"""POST /sdapi/v1/interrogate: a BLIP caption from models/captioners (a tiny random BLIP built here)."""
from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from tests.api.conftest import make_app, serve

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "square", "photo", "of"]


def write_tiny_blip(folder, vocab_dir):
    """A random 1-layer BLIP with a real BERT tokenizer and image processor, saved like the hub folder."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)
    folder.mkdir(parents=True)
    (vocab_dir / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tok = BertTokenizer(str(vocab_dir / "vocab.txt"))
    proc = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok)
    cfg = BlipConfig(vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=16),
                     text_config=dict(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                                      bos_token_id=2, sep_token_id=3, pad_token_id=0), projection_dim=16)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(cfg)
    with torch.no_grad():  # a random model would end at once; this one says "red" every step
        bias = model.text_decoder.cls.predictions.bias
        bias.fill_(-50.0)
        bias[WORDS.index("red")] = 50.0
    model.save_pretrained(folder)
    proc.save_pretrained(folder)


@pytest.fixture(scope="module")
def blip_server(tmp_path_factory):
    from studio.app import Studio
    from studio.settings import Settings

    tmp = tmp_path_factory.mktemp("interrogate")
    models = tmp / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    studio = Studio(Settings(models_dir=str(models), data_dir=str(tmp / "data"), outdir=str(tmp / "out")))
    with serve(make_app(studio)) as url:
        yield url, models, tmp
    studio.close()


def _b64(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_interrogate_without_and_with_a_captioner(blip_server):
    url, models, tmp = blip_server
    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/sdapi/v1/interrogate", json={"image": _b64("red"), "model": "clip"})
        assert r.status_code == 404, r.text
        err = r.json()
        assert err["field"] == "model" and "captioners" in err["detail"]
        assert "blip-image-captioning-base" in err["detail"]

        r = c.post("/sdapi/v1/interrogate", json={"image": _b64("red"), "model": "no-such-model"})
        assert r.status_code == 422 and r.json()["field"] == "model"
        r = c.post("/sdapi/v1/interrogate", json={"image": "not an image", "model": "clip"})
        assert r.status_code == 422 and r.json()["field"] == "image"

        write_tiny_blip(models / "captioners" / "tiny-blip", tmp)
        r = c.post("/sdapi/v1/interrogate", json={"image": _b64("red"), "model": "clip"})
        assert r.status_code == 200, r.text
        text = r.json()["caption"]
        assert text.split() and set(text.split()) == {"red"}
        again = c.post("/sdapi/v1/interrogate", json={"image": _b64("red")}).json()["caption"]
        assert again == text                                  # greedy decoding: the same caption
        by_folder = c.post("/sdapi/v1/interrogate", json={"image": _b64("red"), "model": "tiny-blip"})
        assert by_folder.status_code == 200 and by_folder.json()["caption"] == text
        r = c.post("/sdapi/v1/interrogate", json={"image": _b64("red"), "model": "deepdanbooru"})
        assert r.status_code == 404 and "model 'clip'" in r.json()["detail"]
