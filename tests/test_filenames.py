"""Settings › File name pattern: A1111's FilenameGenerator tags, applied by the engine at once and saved."""
from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

from studio.filenames import NameContext, apply_pattern, file_stem, sanitize_part
from studio.request import GenerationRequest

NOW = datetime.datetime(2024, 3, 5, 14, 7, 9, tzinfo=datetime.timezone.utc)


def ctx(**kw) -> NameContext:
    base = dict(seed=1234, prompt="a (red:1.2) cube, on a table", width=64, height=96, steps=3, cfg_scale=5.0,
                sampler="DPM++ 2M", scheduler="Karras", model_name="sub/tiny-sd1", model_hash="0123456789",
                job_timestamp="20240305140709", now=NOW, clip_skip=2)
    return NameContext(**{**base, **kw})


def test_tags_match_a1111():
    c = ctx()
    assert apply_pattern("[seed]-[steps]-[cfg]-[width]x[height]", c) == "1234-3-5.0-64x96"
    assert apply_pattern("[SAMPLER]_[scheduler]", c) == "DPM++ 2M_Karras"       # tags are case-insensitive
    assert apply_pattern("[model_name]-[model_hash]", c) == "tiny-sd1-0123456789"
    assert apply_pattern("[prompt]", c) == "a_(red_1.2)_cube,_on_a_table"
    assert apply_pattern("[prompt_spaces]", c) == apply_pattern("[prompt_no_styles]", c) == "a (red_1.2) cube, on a table"
    assert apply_pattern("[prompt_words]", c) == "a red 1 2 cube on a table"
    assert apply_pattern("[date]", c) == "2024-03-05"
    assert apply_pattern("[datetime]", c) == NOW.astimezone(None).strftime("%Y%m%d%H%M%S")
    assert apply_pattern("[datetime<%Y_%m_%d %H:%M><Asia/Tokyo>]", c) == "2024_03_05 23_07"   # ':' sanitised
    assert apply_pattern("[datetime<%Y><Not/AZone>]", c) == NOW.astimezone(None).strftime("%Y")
    assert apply_pattern("[job_timestamp]", c) == "20240305140709"
    assert apply_pattern("[clip_skip]", c) == "2"
    assert apply_pattern("[unknown_tag]-[seed]", c) == "[unknown_tag]-1234"      # unknown tags stay as written
    assert apply_pattern("x[none]", c) == "x"


def test_prompt_words_stop_at_eight_and_empty_prompt():
    c = ctx(prompt="one two three four five six seven eight nine ten")
    assert apply_pattern("[prompt_words]", c) == "one two three four five six seven eight"
    assert apply_pattern("[prompt_words]", ctx(prompt="")) == "empty"


def test_batch_tags_and_skipped_text_before_them():
    single = ctx(batch_size=1, n_iter=1, index=0, all_seeds=[1234])
    # a tag with nothing to say drops the text just before it, as in A1111
    assert apply_pattern("[seed]-[batch_number]-[generation_number]-[seed_last]", single) == "1234"
    second = ctx(seed=1235, batch_size=2, n_iter=2, index=3, all_seeds=[1232, 1233, 1234, 1235])
    assert apply_pattern("[batch_number]_[generation_number]_[seed_first]_[seed_last]", second) == "2_4_1232_1235"
    assert apply_pattern("[seed]-[denoising]", ctx(denoising=None)) == "1234"
    assert apply_pattern("[seed]-[denoising]", ctx(denoising=0.75)) == "1234-0.75"


def test_sanitising_and_length():
    assert sanitize_part(' <a>:b"c/d\\e|f?g*h\n. ', replace_spaces=False) == "_a__b_c_d_e_f_g_h_"
    assert len(apply_pattern("[prompt]", ctx(prompt="x" * 400))) == 128
    stem = file_stem(7, "[prompt_spaces]-[prompt_spaces]", ctx(prompt="y" * 300), max_length=255)
    assert stem.startswith("00007-yyy") and len(stem) <= 251
    assert file_stem(3, "a/b:[seed]", ctx()) == "00003-a_b_1234"          # no sub-folders from a pattern
    assert file_stem(3, "[none]", ctx()) == "00003"
    assert file_stem(3, "", ctx()) == "00003-1234"                        # empty: A1111's default [seed]


def test_engine_writes_the_pattern_saved_in_settings(studio, settings):
    from tabs.settings import _save
    pattern = "[seed]-[prompt_words]-[steps]-[width]x[height]-[model_name]-[sampler]"
    message, _ = _save(studio, {"filename_pattern": pattern})
    assert "filename_pattern" in message
    saved = json.loads(Path(settings.settings_file).read_text(encoding="utf-8"))
    assert saved["filename_pattern"] == pattern                              # kept for the next start
    request = GenerationRequest(prompt="a red cube: on, a table", width=64, height=72, steps=2, seed=77,
                                sampler_name="Euler a", batch_size=2)
    result = studio.generate(request)
    names = [Path(p).name for p in result.paths]
    assert names == ["00000-77-a red cube on a table-2-64x72-tiny-sd1-Euler a.png",
                     "00001-78-a red cube on a table-2-64x72-tiny-sd1-Euler a.png"]
    # the next pattern applies to the next image, without a restart; the counter continues
    _save(studio, {"filename_pattern": "[batch_number]"})
    names = [Path(p).name for p in studio.generate(request.replace(seed=5)).paths]
    assert names == ["00002-1.png", "00003-2.png"]
    _save(studio, {"filename_pattern": "[job_timestamp]"})
    name = Path(studio.generate(request.replace(batch_size=1)).paths[0]).name
    assert re.fullmatch(r"00004-\d{14}\.png", name)
