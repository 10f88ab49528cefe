"""The shipped Qwen3 tokenizer (Z-Image's text encoder) gives the published Qwen2 / Qwen3 ids, offline."""
from __future__ import annotations

import pytest

from studio.errors import ModelLoadError
from studio.loading.tokenizers import load_qwen3_tokenizer

# ids published for Qwen's byte-level BPE vocabulary (transformers' tests/models/qwen2/test_tokenization_qwen2.py,
# run against Qwen/Qwen2.5-VL-7B-Instruct); Qwen3 keeps those 151643 tokens and their ids, adding special ones
INTEGRATION = ("This is a test 😊\nI was born in 92000, and this is falsé.\n生活的真谛是\nHi  Hello\nHi   Hello\n\n \n  \n"
               " Hello\n<s>\nhi<s>there\nThe following string should be properly encoded: Hello.\nBut ird and ปี   ird"
               "   ด\nHey how are you doing")
INTEGRATION_IDS = [
    1986, 374, 264, 1273, 26525, 232, 198, 40, 572, 9223, 304, 220, 24, 17, 15, 15, 15, 11, 323, 419, 374, 31932,
    963, 624, 105301, 88051, 116109, 20412, 198, 13048, 220, 21927, 198, 13048, 256, 21927, 271, 48426, 21927, 198,
    44047, 397, 6023, 44047, 29, 18532, 198, 785, 2701, 914, 1265, 387, 10277, 20498, 25, 21927, 624, 3983, 220,
    2603, 323, 220, 54684, 28319, 256, 220, 2603, 256, 220, 37033, 198, 18665, 1246, 525, 498, 3730]
CHAT = "```python\ntokenizer(\"世界，你好！\")```<|im_start|>Hello, world!<|im_end|>\n"
CHAT_IDS = [73594, 12669, 198, 85593, 445, 99489, 3837, 108386, 6313, 899, 73594, 151644, 9707, 11, 1879, 0, 151645,
            198]


@pytest.fixture(scope="module")
def tok():
    return load_qwen3_tokenizer()


def test_shipped_tokenizer_gives_the_published_ids(tok):
    assert tok(INTEGRATION).input_ids == INTEGRATION_IDS
    assert tok.decode(INTEGRATION_IDS) == INTEGRATION


def test_special_tokens_are_single_ids(tok):
    assert tok(CHAT).input_ids == CHAT_IDS
    assert (tok.pad_token, tok.pad_token_id, tok.eos_token_id) == ("<|endoftext|>", 151643, 151645)


def test_chat_template_as_the_z_image_pipeline_applies_it(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hey how are you doing"}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\nHey how are you doing<|im_end|>\n<|im_start|>assistant\n"
    out = tok([text], padding="max_length", max_length=16, truncation=True)
    assert out.input_ids[0][:3] == [151644, 872, 198] and out.input_ids[0][3:8] == [18665, 1246, 525, 498, 3730]
    assert out.input_ids[0][-1] == 151643 and sum(out.attention_mask[0]) == 13


def test_a_folders_own_tokenizer_wins_and_an_empty_one_is_named(tok, tmp_path):
    mine = tmp_path / "tokenizer"
    tok.save_pretrained(str(mine))
    assert (mine / "tokenizer.json").is_file()
    assert load_qwen3_tokenizer(str(mine))(INTEGRATION).input_ids == INTEGRATION_IDS
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="Qwen3 tokenizer in .*empty is missing"):
        load_qwen3_tokenizer(str(empty))
