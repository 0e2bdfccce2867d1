"""The bundled CLIP tokenizer reproduces OpenAI CLIP's ids, offline."""

import gzip
import json

import pytest

from library.models.clip_tokenizer import TOKENIZER_DIR, load_clip_tokenizer
from tools.derive_clip_tokenizer import NUM_MERGES, VOCAB_SIZE, bytes_to_unicode, derive


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


def test_known_prompt_gives_openai_clip_ids(tokenizer):
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_vocabulary_has_clip_size_and_special_tokens(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE == 49408
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    assert tokenizer.model_max_length == 77


def test_bundled_vocab_is_the_clip_construction_of_the_bundled_merges():
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("#version")
    merges = [m for m in lines[1:] if m]
    assert len(merges) == NUM_MERGES
    rebuilt, rebuilt_merges = derive(gzip.compress(("header\n" + "\n".join(merges) + "\n").encode("utf-8")))
    assert rebuilt == vocab
    assert rebuilt_merges == merges
    symbols = list(bytes_to_unicode().values())
    assert len(set(symbols)) == 256 and vocab[symbols[0]] == 0 and vocab[symbols[0] + "</w>"] == 256


def test_derive_rejects_a_short_merge_list():
    with pytest.raises(ValueError, match="merge lines"):
        derive(gzip.compress(b"header\ni n\nt h\n"))


def test_sdxl_second_tokenizer_pads_with_exclamation_mark(tokenizer):
    tokenizer_2 = load_clip_tokenizer(pad_token="!")
    kwargs = {"padding": "max_length", "max_length": 10}
    assert tokenizer_2("a cat", **kwargs).input_ids == [49406, 320, 2368, 49407] + [0] * 6
    assert tokenizer("a cat", **kwargs).input_ids == [49406, 320, 2368, 49407] + [49407] * 6


def test_long_prompt_truncates_to_77_with_end_token(tokenizer):
    ids = tokenizer("cat " * 200, truncation=True, max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407 and set(ids[1:-1]) == {2368}
