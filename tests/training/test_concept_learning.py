"""Training teaches the demo model a concept it has never seen: the held-out heart, behind the trigger word "zkw".

Every run goes through the code path of the Train tab and the API (``TrainingService.start``: a TOML config and one
trainer subprocess per run; the LoRA run is started with ``POST /sdapi/v1/train/start``), on the Train tab's
example dataset (16 pictures of hearts, kohya folder ``10_heart``). The pictures are made by the studio's engine
and read by the demo world's scorer; a concept "is there" when the scorer names the shape a heart. The base model
draws no heart for any seed (it has never seen one), so every rate below is learnt.

Bars (20 seeds each; 400 steps of batch 4 at a constant learning rate with Min-SNR 5 as the demo model was trained,
about 40 s of training per run on an idle 2-core CPU). Without Min-SNR the LoRA's rate swung with the seed (55 % at
seed 0, 90 % at seed 42); with it 95 % (seed 0) and 100 % (seed 1). Exploration runs (one torch thread, no Min-SNR,
seed 42), heart rate with the trigger at step 100/200/300/400:
  lora       lr 1e-3: 25 / 90 / 80 / 90 %     bar 70 % (the issue's)
  locon      lr 1e-3: 20 / 60 / 60 / 95 %     bar 70 %
  loha       lr 3e-3: 40 / 70 / 45 / 75 %     bar 50 % (LoHa's Hadamard product learns in jumps)
  lokr       lr 4e-3: 20 / 40 / 55 / 90 %     bar 60 %
  dreambooth lr 1e-3: 10 / 85 / 85 / 80 %     bar 60 %; "a red circle" without the trigger: a circle in 100 %
Textual Inversion cannot teach this UNet the heart, and no recipe is to blame: an embedding only chooses among the
things the UNet can already draw, and this one has drawn six shapes. On the heart pictures it stays at 0-20 % over
six recipes (lr 5e-3..5e-2, 1-8 vectors, init "shape"/"heart"/"triangle", Min-SNR on/off, captions with and
without the word "heart"). So its bar is set on what TI is for: a made-up word learnt from pictures alone. Sixteen
stars captioned "a red zkw on a blue background" (the word "star" never appears), 4 vectors from "shape", lr 2e-2,
200 steps:
"a red zkwti ..." draws a star for 20/20 seeds, the same prompt without the embedding for 0/20 (circles). Bar 70 %.
Without the LoRA the base model draws a heart for no seed (0 %).
"""
from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from tests.api.conftest import make_app, serve

PROMPT = "zkw, a red heart on a blue background"
SEEDS = 20
SEED = 100

# method -> (config overrides, output name, bar for the heart rate with the trigger)
RUNS = {
    "lora": ({}, "heart_lora", 0.70),
    "locon": ({"conv_rank": 4, "conv_alpha": 2}, "heart_locon", 0.70),
    "loha": ({"learning_rate": 3e-3}, "heart_loha", 0.50),
    "lokr": ({"learning_rate": 4e-3}, "heart_lokr", 0.60),
    "dreambooth_lora": ({"class_prompt": "a shape", "num_class_images": 16, "prior_loss_weight": 1.0},
                        "heart_db", 0.60),
}
TI_NAME = "zkwti"          # the embedding's file name triggers it (A1111); "zkw" is its placeholder in the captions
# 200 steps: the star rate was 95 / 100 / 95 % at 150 / 200 / 250 steps (100 % at 400)
TI = {"method": "textual_inversion", "token": "zkw", "init_word": "shape", "num_vectors": 4, "learning_rate": 2e-2,
      "output_name": TI_NAME, "max_steps": 200}
TI_CONCEPT, TI_BAR = "star", 0.70
REFINE_STEPS = 100      # on the 8 picked pictures, batch 4, from heart_lora


def _base() -> dict:
    """The Train tab's example-dataset settings (studio.demo.EXAMPLE_RECIPE), as its button fills them in."""
    from studio.demo import EXAMPLE_RECIPE
    return {"base_model": "demo-shapes", "resolution": 64, "min_image_side": 32, "seed": 0, "sample_at_start": False,
            **EXAMPLE_RECIPE}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A studio with the trained demo model and the Train tab's example dataset, served over HTTP."""
    from studio.app import Studio
    from studio.demo import TRAINED_NAME, install_demo_model
    from studio.demo_world import write_example_dataset
    from studio.settings import Settings

    tmp = tmp_path_factory.mktemp("concepts")
    settings = Settings(models_dir=str(tmp / "models"), data_dir=str(tmp / "data"), outdir=str(tmp / "outputs"),
                        default_checkpoint=TRAINED_NAME, save_images=False)
    install_demo_model(settings)
    studio = Studio(settings, load_extensions=False)
    dataset = studio.training.datasets_dir() / "heart"
    write_example_dataset(dataset, "heart", count=16, trigger="zkw", repeats=10)
    ti_dataset = studio.training.datasets_dir() / "zkw-star"
    write_example_dataset(ti_dataset, TI_CONCEPT, count=16, repeats=10, stand_in="zkw")
    try:
        with serve(make_app(studio)) as url, httpx.Client(base_url=url, timeout=600) as client:
            yield SimpleNamespace(studio=studio, client=client, dataset=dataset, ti_dataset=ti_dataset)
    finally:
        studio.training.stop()
        studio.training.wait(60)
        studio.queue.interrupt()
        studio.close()


def _config(world, method: str) -> dict:
    overrides, name, _ = RUNS[method]
    cfg = {**_base(), "method": method, "dataset_dir": str(world.dataset), "output_name": name, **overrides}
    if method == "dreambooth_lora":
        cfg["class_images_dir"] = str(world.studio.training.datasets_dir() / "class-shape")
    return cfg


@pytest.fixture(scope="module")
def trained(world):
    """Every run queued at once (the service runs them one after another); the LoRA one over REST."""
    r = world.client.post("/sdapi/v1/train/start", json=_config(world, "lora"))
    assert r.status_code == 200, r.text
    for method in RUNS:
        if method != "lora":
            world.studio.training.start(_config(world, method), confined=True)
    world.studio.training.start({**_base(), "dataset_dir": str(world.ti_dataset), **TI}, confined=True)
    assert world.studio.training.wait(1800), world.studio.training.status()
    states = {h["config"].split("/")[-2]: h["state"] for h in world.studio.training.history() if h.get("config")}
    names = [name for _, name, _ in RUNS.values()] + [TI_NAME]
    assert all(states.get(name) == "done" for name in names), world.studio.training.history()
    return world


def _images(world, prompt: str, seed: int = SEED) -> list:
    """SEEDS pictures (seeds seed..seed+19) through /sdapi/v1/txt2img: the path an API client takes."""
    from PIL import Image
    body = {"prompt": prompt, "seed": seed, "steps": 20, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
            "cfg_scale": 7, "width": 64, "height": 64, "batch_size": 5, "n_iter": SEEDS // 5}
    r = world.client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    return [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in r.json()["images"]]


def heart_rate(world, prompt: str) -> float:
    from studio.demo_world import score
    return sum(score(im).shape == "heart" for im in _images(world, prompt)) / SEEDS


def test_base_model_has_never_seen_a_heart(trained):
    assert heart_rate(trained, PROMPT) <= 0.10


@pytest.mark.parametrize("method", list(RUNS))
def test_training_teaches_the_held_out_heart(trained, method):
    _, name, bar = RUNS[method]
    rate = heart_rate(trained, f"{PROMPT} <lora:{name}:1>")
    assert rate >= bar, f"{method}: heart in {rate:.0%} of {SEEDS} seeds, bar {bar:.0%}"


def test_lora_at_weight_zero_is_the_base_model_bit_for_bit(trained):
    plain = _images(trained, PROMPT)
    zero = _images(trained, f"{PROMPT} <lora:heart_lora:0>")
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, zero))


def test_dreambooth_prior_preservation_keeps_the_class(trained):
    """With the DreamBooth LoRA on, a prompt without the trigger still draws what it says."""
    from studio.demo_world import score
    ims = _images(trained, "a red circle on a blue background <lora:heart_db:1>")
    assert sum(score(im).shape == "circle" for im in ims) / SEEDS >= 0.7


def test_textual_inversion_learns_a_made_up_word_from_pictures_alone(trained):
    """The embedding, named in the prompt by its file name as in A1111, draws the shape its captions never named."""
    from studio.demo_world import score
    def rate(prompt: str) -> float:
        return sum(score(im).shape == TI_CONCEPT for im in _images(trained, prompt)) / SEEDS
    learnt, without = rate(f"a red {TI_NAME} on a blue background"), rate("a red zkw on a blue background")
    assert learnt >= TI_BAR and without <= 0.10, (learnt, without)


def test_merge_half_of_the_baked_lora_sits_between(trained):
    """Bake the LoRA into a checkpoint, weighted-sum it 0.5 with the base: the heart strength lies between."""
    from studio.demo_world import score
    c = trained.client
    r = c.post("/sdapi/v1/merge/lora", json={"action": "bake", "checkpoint": "demo-shapes",
                                             "loras": [{"name": "heart_lora", "weight": 1.0}],
                                             "output_name": "demo-heart"})
    assert r.status_code == 200, r.text
    r = c.post("/sdapi/v1/merge/checkpoints", json={"a": "demo-shapes", "b": "demo-heart", "multiplier": 0.5,
                                                    "output_name": "demo-half-heart"})
    assert r.status_code == 200, r.text

    def strength(model: str) -> float:
        """Mean scorer distance to a heart (0 = a perfect heart): continuous, so 'between' is measurable."""
        c.post("/sdapi/v1/options", json={"sd_model_checkpoint": model}).raise_for_status()
        return float(np.mean([score(im).shape_distances["heart"] for im in _images(trained, PROMPT)]))

    base, half, full = strength("demo-shapes"), strength("demo-half-heart"), strength("demo-heart")
    assert full < half < base, (base, half, full)


def test_refining_on_the_best_eight_pictures_keeps_the_heart(trained):
    """The loop an artist runs: generate with the LoRA, send the best 8 pictures (by the scorer, as an artist
    picks by eye) back into a dataset through the REST route the gallery button shares, refine the LoRA from its
    file on them (``network_weights`` by name) and the heart rate does not drop. Picks come from other seeds
    (500...) than the ones measured (100...)."""
    from studio.demo_world import score
    c = trained.client
    prompt = f"{PROMPT} <lora:heart_lora:1>"
    body = {"prompt": prompt, "seed": 500, "steps": 20, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
            "cfg_scale": 7, "width": 64, "height": 64, "batch_size": 4, "n_iter": 4}
    r = c.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    import json
    from PIL import Image
    infotexts = json.loads(r.json()["info"])["infotexts"]
    scored = []
    for data, text in zip(r.json()["images"], infotexts):
        s = score(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
        scored.append((s.shape != "heart", s.shape_distances["heart"], data, text))
    best = sorted(scored, key=lambda t: t[:2])[:8]
    for i, (_, _, data, text) in enumerate(best):
        sent = c.post("/sdapi/v1/train/datasets/add", json={"dataset": "heart-picked", "image": data,
                                                            "infotext": text, "name": f"pick{i}"})
        assert sent.status_code == 200 and sent.json()["caption"] == PROMPT, sent.text
    folder = trained.studio.training.datasets_dir() / "heart-picked"
    refine = {**_config(trained, "lora"), "dataset_dir": str(folder), "output_name": "heart_lora_r2",
              "network_weights": "heart_lora", "max_steps": REFINE_STEPS, "repeats": 1}
    r = c.post("/sdapi/v1/train/start", json=refine)
    assert r.status_code == 200, r.text
    assert trained.studio.training.wait(900), trained.studio.training.status()
    history = {h["config"].split("/")[-2]: h for h in trained.studio.training.history()}
    assert history["heart_lora_r2"]["state"] == "done", history["heart_lora_r2"]
    assert history["heart_lora_r2"]["dataset"]["images"] == 8
    before, after = heart_rate(trained, prompt), heart_rate(trained, f"{PROMPT} <lora:heart_lora_r2:1>")
    assert after >= before, f"heart in {after:.0%} of {SEEDS} seeds after refining, {before:.0%} before"
