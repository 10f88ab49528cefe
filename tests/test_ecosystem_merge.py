"""Checkpoint merges as A1111 records them: family refusal, sd_merge_recipe keys, custom_name, config copy."""
from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from studio.errors import StudioError
from studio.merge import MergeSpec, merge_checkpoints

# A1111 modules/extras.py run_modelmerger: the keys of merge_recipe
A1111_RECIPE_KEYS = {"type", "primary_model_hash", "secondary_model_hash", "tertiary_model_hash", "interp_method",
                     "multiplier", "save_as_half", "custom_name", "config_source", "bake_in_vae", "discard_weights",
                     "is_inpainting", "is_instruct_pix2pix"}


@pytest.fixture()
def registry(settings):
    from studio.registry import Registry
    return Registry(settings)


def _recipe(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["sd_merge_recipe"])


@pytest.mark.parametrize("b", ["tiny-sd2", "tiny-sdxl"])
def test_other_family_is_refused_naming_both_and_nothing_is_listed(registry, settings, b):
    before = {i.title for i in registry.checkpoints()}
    with pytest.raises(StudioError) as err:
        merge_checkpoints(MergeSpec(a="tiny-sd1", b=b, output_name="mixed"), registry, settings)
    msg = str(err.value)
    assert err.value.field == "model_b" and "SD 1.x" in msg and ("SD 2.x" in msg or "SDXL" in msg)
    assert "tiny-sd1" in msg and b in msg
    assert not list(settings.ckpt_path.glob("mixed*"))
    registry.refresh()
    assert {i.title for i in registry.checkpoints()} == before


def test_recipe_has_a1111_keys_and_custom_name_without_extension(registry, settings):
    out = merge_checkpoints(MergeSpec(a="tiny-sd1", b="tiny-sd1-b", output_name="my.safetensors"), registry,
                            settings)
    assert out.name == "my.safetensors"
    recipe = _recipe(out)
    assert A1111_RECIPE_KEYS <= set(recipe)
    assert recipe["custom_name"] == "my" and recipe["config_source"] == 0
    assert recipe["interp_method"] == "Weighted sum" and recipe["type"] == "webui"
    derived = merge_checkpoints(MergeSpec(a="tiny-sd1", b="tiny-sd1-b"), registry, settings)
    assert _recipe(derived)["custom_name"] == ""          # A1111 records "" when the name was not given


@pytest.mark.parametrize("source,expected", [(0, "a"), (1, "b"), (3, None)])
def test_config_source_copies_the_sidecar_yaml(registry, settings, source, expected):
    ckpt = settings.ckpt_path
    (ckpt / "tiny-sd1.yaml").write_text("model:\n  params:\n    parameterization: v  # a\n")
    (ckpt / "tiny-sd1-b.yaml").write_text("model:\n  params:\n    parameterization: v  # b\n")
    registry.refresh()
    out = merge_checkpoints(MergeSpec(a="tiny-sd1", b="tiny-sd1-b", output_name=f"cfg{source}",
                                      config_source=source), registry, settings)
    yaml = out.with_suffix(".yaml")
    if expected is None:
        assert not yaml.exists()
    else:
        assert yaml.read_text().endswith(f"# {expected}\n")
    assert _recipe(out)["config_source"] == source


def test_config_source_is_checked(registry, settings):
    with pytest.raises(StudioError) as err:
        merge_checkpoints(MergeSpec(a="tiny-sd1", b="tiny-sd1-b", config_source=7), registry, settings)
    assert err.value.field == "config_source"


def test_merge_tab_passes_copy_config_from(registry, settings):
    """The Merge tab's "Copy config (.yaml) from" radio reaches the merge: B's sidecar, recorded in the recipe."""
    from tabs.merge import _spec

    (settings.ckpt_path / "tiny-sd1-b.yaml").write_text("model:\n  params:\n    parameterization: v  # b\n")
    registry.refresh()
    spec = _spec("tiny-sd1", "tiny-sd1-b", None, "weighted_sum", 0.5, False, "", 0.3, "tabcfg", "safetensors",
                 False, "None", "", True, False, 1)
    out = merge_checkpoints(spec, registry, settings)
    assert out.with_suffix(".yaml").read_text().endswith("# b\n")
    assert _recipe(out)["config_source"] == 1
