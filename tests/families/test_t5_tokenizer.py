"""The shipped T5 v1.1 tokenizer (Flux / SD3 text encoder 2 / 3) gives the original tokenizer's ids, offline."""
from __future__ import annotations

import shutil

import pytest

from studio.errors import ModelLoadError
from studio.loading.tokenizers import T5_TOKENIZER_DIR, load_t5_tokenizer

# ids published with google-t5's sentencepiece tokenizer (the transformers T5 tokenizer tests); T5 v1.1, which
# Flux and SD3 use, shares that 32k vocabulary
REFERENCE = [
    ("The quick brown fox jumps over the lazy dog.", [37, 1704, 4216, 3, 20400, 4418, 7, 147, 8, 19743, 1782, 5, 1]),
    ("A long paragraph for summarization.", [71, 307, 8986, 21, 4505, 1635, 1707, 5, 1]),
    ("Summary of the text.", [20698, 13, 8, 1499, 5, 1]),
    ("Hey how are you doing", [9459, 149, 33, 25, 692, 1]),
    ("BERT is designed to pre-train deep bidirectional representations from unlabeled text by jointly "
     "conditioning on both left and right context in all layers.",
     [272, 24203, 19, 876, 12, 554, 18, 9719, 1659, 2647, 26352, 6497, 7, 45, 73, 9339, 400, 26, 1499, 57, 22801,
      10760, 30, 321, 646, 11, 269, 2625, 16, 66, 7500, 5, 1]),
]


@pytest.mark.parametrize("text,ids", REFERENCE)
def test_shipped_tokenizer_gives_the_original_ids(text, ids):
    assert load_t5_tokenizer()(text).input_ids == ids


def test_special_tokens_and_padding_as_flux_uses_them():
    tok = load_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok("<pad> Today is <unk> nice day </s>", add_special_tokens=False).input_ids == \
        [0, 1960, 19, 2, 1245, 239, 1]
    out = tok("a red circle", padding="max_length", max_length=16, truncation=True).input_ids
    assert len(out) == 16 and out[-1] == 0 and 1 in out
    assert tok.convert_tokens_to_ids("<extra_id_0>") == 32099


def test_a_users_tokenizer_folder_is_read_and_an_empty_one_is_named(tmp_path):
    mine = tmp_path / "tokenizer_2"
    shutil.copytree(T5_TOKENIZER_DIR, mine)
    assert load_t5_tokenizer(str(mine))("Hey how are you doing").input_ids == REFERENCE[3][1]
    empty = tmp_path / "tokenizer_3"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"tokenizer_3 is missing: neither tokenizer.json nor spiece.model"):
        load_t5_tokenizer(str(empty))
