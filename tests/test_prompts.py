"""The A1111 prompt language: parser examples, chunking, BREAK, emphasis, schedules, caching."""
from __future__ import annotations

import pytest
import torch

from studio.prompt_parser import extract_extra_networks, parse_attention, prompt_schedule, split_and
from studio.prompts import PromptEncoder
from studio.request import GenerationRequest


# ---- parser (A1111's own docstring examples) ------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
])
def test_parse_attention(text, expected):
    assert parse_attention(text) == expected


@pytest.mark.parametrize("text,steps,expected", [
    ("test", 10, [(10, "test")]),
    ("a [b:3]", 10, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, [(5, "a  c"), (10, "a b c")]),
    ("a [{b|d{:.5] c", 10, [(5, "a  c"), (10, "a {b|d{ c")]),
    ("((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", 3, [(1, "a"), (2, "(b:1.1)"), (3, "a")]),
    ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
     "[: in background:0.25] [shoddy:masterful:0.5]", 100,
     [(25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
      (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
      (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
      (75, "fantasy landscape with a lake and an oak in background masterful"),
      (100, "fantasy landscape with a lake and a christmas tree in background masterful")]),
])
def test_prompt_schedule(text, steps, expected):
    assert prompt_schedule(text, steps) == expected


def test_extra_networks_and_and():
    text, nets = extract_extra_networks("castle <lora:foo:0.5>, night <lora:bar:0.2:1>")
    assert text == "castle , night "
    assert [(n.name, n.te_weight, n.unet_weight) for n in nets] == [("foo", 0.5, 0.5), ("bar", 0.2, 1.0)]
    assert split_and("a cat AND a dog:0.5") == [("a cat", 1.0), ("a dog", 0.5)]


# ---- encoding on the tiny models ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd1():
    from tests.tinymodels import make_tiny
    return make_tiny("sd1", seed=0)


def test_long_prompt_and_break_chunk_shapes(sd1):
    enc = PromptEncoder()
    short = enc.encode(sd1, "a cat", "", steps=4).kwargs()["prompt_embeds"]
    assert short.shape[1] == 77
    long_text = ", ".join(["cat"] * 45)  # 89 tokens
    long = enc.encode(sd1, long_text, "", steps=4).kwargs()
    assert long["prompt_embeds"].shape[1] == 154 and long["negative_prompt_embeds"].shape[1] == 154
    broken = enc.encode(sd1, "a cat BREAK a dog", "", steps=4).kwargs()["prompt_embeds"]
    assert broken.shape[1] == 154
    used, available = enc.count_tokens(sd1.tokenizer, long_text)
    assert available == 150 and 75 < used <= 150


def test_emphasis_changes_only_weighted_conditioning(sd1):
    enc = PromptEncoder()
    plain = enc.encode(sd1, "a red cube", "", steps=4).kwargs()["prompt_embeds"]
    same = enc.encode(sd1, "a (red:1) cube", "", steps=4).kwargs()["prompt_embeds"]
    heavy = enc.encode(sd1, "a (red:1.5) cube", "", steps=4).kwargs()["prompt_embeds"]
    assert torch.equal(plain, same)
    assert not torch.allclose(plain, heavy)
    assert torch.allclose(plain.mean(), heavy.mean(), atol=1e-5)  # A1111 restores the mean


def test_plain_prompt_matches_diffusers_encoding(sd1):
    from tests.tinymodels import make_pipeline

    ours = PromptEncoder().encode(sd1, "a red cube", "blurry", steps=4).kwargs()
    theirs, neg = make_pipeline(sd1).encode_prompt("a red cube", "cpu", 1, True, "blurry")
    assert torch.equal(ours["prompt_embeds"], theirs) and torch.equal(ours["negative_prompt_embeds"], neg)


def test_conditioning_cache_runs_encoder_once(studio):
    base = GenerationRequest(prompt="a castle, (sunset:1.2)", steps=2, width=64, height=64, save_images=False)
    studio.generate(base.replace(seed=1))
    runs = studio.prompts.encoder_runs
    studio.generate(base.replace(seed=2))
    assert studio.prompts.encoder_runs == runs


def test_prompt_edit_switches_at_the_right_step(studio):
    """Capture the text conditioning the UNet sees at each step of "[red:blue:2]" over 4 steps."""
    seen = []
    with studio.manager.acquire() as loaded:
        comps = loaded.components
        hook = comps.unet.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"][-1:].clone()), with_kwargs=True)
    try:
        studio.generate(GenerationRequest(prompt="[red:blue:2] cube", steps=4, width=64, height=64,
                                          sampler_name="Euler", save_images=False, cfg_scale=5))
    finally:
        hook.remove()
    red = studio.prompts.encode(comps, "red cube", "", steps=4).kwargs()["prompt_embeds"]
    blue = studio.prompts.encode(comps, "blue cube", "", steps=4).kwargs()["prompt_embeds"]
    kinds = ["red" if torch.equal(s, red) else "blue" if torch.equal(s, blue) else "?" for s in seen]
    assert kinds == ["red", "red", "red", "blue"]  # steps 0..2 use "red" (end step 2, A1111 rule), then "blue"


def test_alternation_changes_every_step(studio):
    seen = []
    with studio.manager.acquire() as loaded:
        hook = loaded.components.unet.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"][-1:].clone()), with_kwargs=True)
    try:
        studio.generate(GenerationRequest(prompt="[cat|dog]", steps=4, width=64, height=64, sampler_name="Euler",
                                          save_images=False))
    finally:
        hook.remove()
    # A1111's rule (0-based step k takes the first entry ending at >= k) gives cat, cat, dog, cat
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2]) and torch.equal(seen[3], seen[0])


def test_sdxl_long_prompt_and_weights(studio):
    res = studio.generate(GenerationRequest(prompt=", ".join(["(big:1.3) tree"] * 40), negative_prompt="ugly",
                                            checkpoint="tiny-sdxl.safetensors", steps=2, width=64, height=64,
                                            save_images=False))
    assert res.images[0].size == (64, 64)


# ---- limits, deep nesting, interrupt (issue 14) ---------------------------------------------------------------
def test_deep_nesting_parses_without_recursion_limit():
    deep = "(" * 5000 + "cat" + ")" * 5000
    assert prompt_schedule(deep, 10) == [(10, deep)]
    [(text, weight)] = parse_attention(deep)
    assert text == "cat" and weight > 1e200
    squares = "[" * 3000 + "x" + "]" * 3000
    assert prompt_schedule(squares, 10) == [(10, squares)]
    nested = "[a:" * 800 + "b" + ":5]" * 800   # schedules inside schedules, 800 deep
    assert prompt_schedule(nested, 10) == [(5, "a"), (10, "b")]
    for unclosed in ("(" * 10000, "[" * 10000, "([" * 5000, "[a:" * 3000, "[a|" * 3000):
        assert prompt_schedule(unclosed, 20) == [(20, unclosed)]


def test_malformed_numbers_stay_text():
    assert parse_attention("(a:1.2.3) b") == [("a:1.2.3", 1.1), (" b", 1.0)]
    assert prompt_schedule("[a:b:" + "9" * 400 + "]", 10) == [(10, "a")]


@pytest.mark.parametrize("changes,field", [
    ({"prompt": "x" * 10001}, "prompt"),
    ({"negative_prompt": "x" * 10001}, "negative_prompt"),
    ({"hr_prompt": "x" * 10001}, "hr_prompt"),
    ({"hr_negative_prompt": "a BREAK " * 1000}, "hr_negative_prompt"),
    ({"prompt": "a BREAK " * 1000}, "prompt"),
    ({"prompt": "\ud800 x"}, "prompt"),
    ({"negative_prompt": "ok \udfff"}, "negative_prompt"),
])
def test_prompt_limits_name_the_field(changes, field):
    from studio.errors import StudioError

    with pytest.raises(StudioError) as err:
        GenerationRequest(**changes).validate()
    assert err.value.field == field and field in str(err.value)
    GenerationRequest(prompt="x" * 10000, negative_prompt="a BREAK " * 63).validate()   # at the limits


def test_prompt_limits_follow_settings():
    from studio.errors import StudioError
    from studio.settings import Settings

    with pytest.raises(StudioError, match="limit is 20"):
        GenerationRequest(prompt="x" * 21).validate(Settings(max_prompt_length=20))
    with pytest.raises(StudioError, match="limit is 2"):
        GenerationRequest(prompt="a BREAK b BREAK c").validate(Settings(max_prompt_chunks=2))


def test_encoder_caps_chunks_and_stops_between_them(sd1):
    from studio.errors import JobInterrupted, StudioError

    enc = PromptEncoder()
    with pytest.raises(StudioError) as err:
        enc.encode(sd1, ", ".join(["cat"] * 200), "", steps=4, max_chunks=2)
    assert err.value.field == "prompt"
    calls = []

    def check():
        calls.append(1)
        if len(calls) >= 3:
            raise JobInterrupted("stop")

    with pytest.raises(JobInterrupted):
        enc.encode(sd1, " BREAK ".join(["cat"] * 10), "", steps=4, check=check)
    assert enc.encoder_runs < 10


def test_interrupt_stops_prompt_encoding(studio):
    """Interrupt during encoding of a 20-chunk prompt: the job ends without encoding the rest."""
    forwards = []
    job_box = []

    def on_forward(module, args, output):
        forwards.append(1)
        if len(forwards) == 2:
            job_box[0].interrupt()

    with studio.manager.acquire() as loaded:
        hook = loaded.components.text_encoder.register_forward_hook(on_forward)
    try:
        prompt = " BREAK ".join(f"word{i}" for i in range(20))
        job = studio.submit(GenerationRequest(prompt=prompt, steps=2, width=64, height=64, save_images=False))
        job_box.append(job)
        result = job.wait(300)
    finally:
        hook.remove()
    assert job.state == "interrupted"
    assert result is not None and result.interrupted and result.images == []
    assert len(forwards) < 20
