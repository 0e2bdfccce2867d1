import math
import random
import re
from collections import Counter
from dataclasses import replace

import pytest

from library.data.captions import (
    CaptionOptions,
    CaptionStep,
    find_caption_file,
    process_caption,
    read_caption,
    sample_rng,
    tag_frequency,
)
from library.errors import DatasetError

TAGS = "zkw, red, heart, checkered, small, top left, blue background"
DRAWS = 20_000


def _process(caption, opts, seed=0, epoch=1, index=0, step=0, max_steps=0):
    return process_caption(caption, opts, sample_rng(seed, epoch, index, 0), CaptionStep(epoch, step, max_steps))


def sd_scripts_caption(caption: str, o: CaptionOptions, rand: random.Random, epoch: int, step: int = 0,
                       max_steps: int = 0) -> str:
    """sd-scripts' BaseDataset.process_caption restated from its definition (1-based epoch, `rand` in place of the
    global RNG): the reference the tests compare against."""
    if o.caption_prefix:
        caption = o.caption_prefix + " " + caption
    if o.caption_suffix:
        caption = caption + " " + o.caption_suffix
    drop = o.caption_dropout_rate > 0 and rand.random() < o.caption_dropout_rate
    if drop or (o.caption_dropout_every_n_epochs > 0 and epoch % o.caption_dropout_every_n_epochs == 0):
        return ""
    if o.enable_wildcard:
        if "\n" in caption:
            caption = rand.choice(caption.split("\n"))
        caption = caption.replace("{{", "\x00").replace("}}", "\x01")
        caption = re.sub(r"\{([^}]+)\}", lambda m: rand.choice(m.group(1).split("|")), caption)
        caption = caption.replace("\x00", "{").replace("\x01", "}")
    else:
        caption = caption.split("\n")[0]
    sep = o.caption_separator
    if o.shuffle_caption or o.token_warmup_step > 0 or o.caption_tag_dropout_rate > 0:
        fixed, flex, tail = [], [], []
        kts = o.keep_tokens_separator
        if kts and kts in caption:
            head, rest = caption.split(kts, 1)
            if kts in rest:
                rest, end = rest.split(kts, 1)
                tail = [t.strip() for t in end.split(sep) if t.strip()]
            fixed = [t.strip() for t in head.split(sep) if t.strip()]
            flex = [t.strip() for t in rest.split(sep) if t.strip()]
        else:
            tokens = [t.strip() for t in caption.strip().split(sep)]
            flex = tokens[:]
            if o.keep_tokens > 0:
                fixed, flex = flex[:o.keep_tokens], tokens[o.keep_tokens:]
        warm = o.token_warmup_step
        if warm < 1:
            warm = math.floor(warm * max_steps)
        if warm and step < warm:
            flex = flex[:math.floor(step * ((len(flex) - o.token_warmup_min) / warm)) + o.token_warmup_min]
        if o.shuffle_caption:
            rand.shuffle(flex)
        if o.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rand.random() >= o.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + tail)
    if o.secondary_separator:
        caption = caption.replace(o.secondary_separator, sep)
    return caption


def _distance(caption: str, opts: CaptionOptions, epoch: int = 1, step: int = 0, max_steps: int = 0) -> float:
    """Total-variation distance between our captions over DRAWS samples and sd-scripts' over DRAWS draws."""
    ours = Counter(_process(caption, opts, seed=11, epoch=epoch, index=i, step=step, max_steps=max_steps)
                   for i in range(DRAWS))
    rand = random.Random(5)
    ref = Counter(sd_scripts_caption(caption, opts, rand, epoch, step, max_steps) for _ in range(DRAWS))
    assert set(ours) <= set(ref) | {k for k, v in ours.items() if v < 10}, set(ours) - set(ref)
    return sum(abs(ours[k] - ref[k]) for k in set(ours) | set(ref)) / (2 * DRAWS)


def test_caption_file_discovery(tmp_path):
    img = tmp_path / "a.b.png"
    assert find_caption_file(img, None) is None
    (tmp_path / "a.b.txt").write_text("txt")
    assert find_caption_file(img, None) == tmp_path / "a.b.txt"  # stem keeps inner dots
    (tmp_path / "a.b.caption").write_text("cap")
    assert find_caption_file(img, None) == tmp_path / "a.b.caption"  # .caption wins when not told
    assert find_caption_file(img, ".txt") == tmp_path / "a.b.txt"
    assert find_caption_file(img, ".tags") is None  # an explicit extension is the only one tried


def test_read_caption_first_line_or_every_line_with_wildcards(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("\ufeff  猫, 写真, かわいい  \n\n second line \n".encode())
    assert read_caption(path) == "猫, 写真, かわいい"  # sd-scripts: lines[0].strip() (the BOM is not text)
    assert read_caption(path, enable_wildcard=True) == "猫, 写真, かわいい\nsecond line"  # blank lines left out
    path.write_bytes(b"\nlater")
    assert read_caption(path) == ""  # the first line, even when empty, as sd-scripts reads it
    path.write_bytes(b"")
    assert read_caption(path) == ""


def test_invalid_utf8_names_file_and_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"caf\xe9 au lait")  # Latin-1 e-acute
    with pytest.raises(DatasetError, match=r"bad\.txt is not valid UTF-8 \(byte 0xe9 at offset 3\); re-save it as UTF-8"):
        read_caption(path)


@pytest.mark.parametrize("caption, opts", [
    (TAGS, CaptionOptions()),
    ("zkw, 1girl ||| red, blue ||| best", CaptionOptions(keep_tokens_separator="|||")),  # left untouched
    ("a,,b ,  c", CaptionOptions(keep_tokens=1)),  # keep_tokens alone does not rewrite the caption
    ("red;;;dress, blue", CaptionOptions(secondary_separator=";;;")),  # -> caption_separator ","
    ("red, blue", CaptionOptions(caption_prefix="zkw,", caption_suffix="best")),
    ("first line\nsecond line", CaptionOptions()),
    ("a; b; c", CaptionOptions(caption_separator=";", keep_tokens=1, caption_tag_dropout_rate=1.0)),
])
def test_deterministic_captions_equal_sd_scripts(caption, opts):
    assert _process(caption, opts) == sd_scripts_caption(caption, opts, random.Random(0), 1)


def test_deterministic_values():
    assert _process("zkw, 1girl ||| red ||| best", CaptionOptions(keep_tokens_separator="|||")) \
        == "zkw, 1girl ||| red ||| best"
    assert _process("red;;;dress, blue", CaptionOptions(secondary_separator=";;;")) == "red,dress, blue"
    assert _process("red, blue", CaptionOptions(caption_prefix="zkw,", caption_suffix="best")) == "zkw, red, blue best"
    assert _process("a; b; c", CaptionOptions(caption_separator=";", keep_tokens=1,
                                              caption_tag_dropout_rate=1.0)) == "a"


def test_caption_dropout_every_n_epochs_is_one_based():
    opts = CaptionOptions(caption_dropout_every_n_epochs=3)
    assert [e for e in range(1, 10) if _process(TAGS, opts, epoch=e) == ""] == [3, 6, 9]


def test_prefix_counts_toward_keep_tokens_and_suffix_shuffles_and_drops():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=1, caption_prefix="zkw,", caption_suffix="best",
                          caption_tag_dropout_rate=0.25)
    caption = "red, , blue"  # the empty tag is a tag under shuffling, as in sd-scripts
    outputs = Counter(_process(caption, opts, index=i) for i in range(2000))
    assert all(o.startswith("zkw") for o in outputs)
    assert any(o.endswith("blue best") for o in outputs) and any(o.startswith("zkw, blue best,") for o in outputs)
    assert any(o.startswith("zkw, , ") for o in outputs)  # the empty tag moves too
    assert _distance(caption, opts) < 0.05


def test_keep_tokens_separator_head_tail_and_secondary_separator_distribution():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||", secondary_separator=";;;",
                          caption_tag_dropout_rate=0.2)
    caption = "zkw, 1girl ||| red;;;dress, blue, hat ||| masterpiece"
    for i in range(50):
        out = [t.strip() for t in _process(caption, opts, index=i).split(",")]
        assert out[:2] == ["zkw", "1girl"] and out[-1] == "masterpiece"
        if "red" in out:
            assert out[out.index("red") + 1] == "dress"  # kept together through the shuffle
    assert _distance(caption, opts) < 0.05


def test_wildcards_pick_a_line_and_an_option_like_sd_scripts():
    opts = CaptionOptions(enable_wildcard=True, caption_prefix="zkw")
    caption = "a {red|blue} cat\n{{x}} {big|small|tiny} dog"
    outputs = Counter(_process(caption, opts, index=i) for i in range(DRAWS))
    assert set(outputs) == {"zkw a red cat", "zkw a blue cat", "{x} big dog", "{x} small dog", "{x} tiny dog"}
    assert _distance(caption, opts) < 0.03
    assert abs(outputs["zkw a red cat"] / DRAWS - 0.25) < 0.015  # line 1/2, then option 1/2


def test_caption_dropout_rate_and_tag_dropout_distribution():
    opts = CaptionOptions(caption_dropout_rate=0.3, caption_tag_dropout_rate=0.5, keep_tokens=1)
    caption = "zkw, red, heart, small"
    dropped = sum(_process(caption, opts, index=i) == "" for i in range(DRAWS))
    assert abs(dropped / DRAWS - 0.3) < 4 * (0.3 * 0.7 / DRAWS) ** 0.5
    assert _distance(caption, opts) < 0.04


@pytest.mark.parametrize("warmup_step, max_steps", [(0.5, 20), (8, 100)])
def test_token_warmup_grows_tags_with_the_step(warmup_step, max_steps):
    opts = CaptionOptions(keep_tokens=1, token_warmup_min=2, token_warmup_step=warmup_step)
    caption = "zkw, " + ", ".join(f"t{i}" for i in range(9))
    got = [_process(caption, opts, step=s, max_steps=max_steps) for s in range(12)]
    assert got == [sd_scripts_caption(caption, opts, random.Random(0), 1, s, max_steps) for s in range(12)]
    assert got[0] == "zkw, t0, t1" and got[-1] == caption  # min tags at step 0, all once warmed up
    assert len(set(got)) > 4


def test_token_warmup_with_shuffle_distribution():
    opts = CaptionOptions(shuffle_caption=True, token_warmup_min=1, token_warmup_step=10)
    assert _distance("a, b, c, d, e, f", opts, step=5) < 0.04


def test_shuffle_is_deterministic_in_seed_epoch_index():
    opts = CaptionOptions(shuffle_caption=True)
    a = [_process(TAGS, opts, seed=7, epoch=e, index=i) for e in range(3) for i in range(5)]
    b = [_process(TAGS, opts, seed=7, epoch=e, index=i) for e in range(3) for i in range(5)]
    c = [_process(TAGS, opts, seed=8, epoch=e, index=i) for e in range(3) for i in range(5)]
    assert a == b and a != c


def test_random_flag_marks_captions_that_cannot_be_cached():
    assert not CaptionOptions(caption_prefix="zkw", keep_tokens_separator="|||", secondary_separator=";").random
    for change in ({"shuffle_caption": True}, {"caption_dropout_rate": 0.1}, {"caption_dropout_every_n_epochs": 2},
                   {"caption_tag_dropout_rate": 0.1}, {"token_warmup_step": 5}, {"enable_wildcard": True}):
        assert replace(CaptionOptions(), **change).random, change


def test_tag_frequency_counts_like_sd_scripts():
    freq = tag_frequency(["zkw, (red), Heart", "zkw,  blue ,heart", "a;;;b", ""])
    assert freq == {"zkw": 2, "(red)": 1, "heart": 2, "blue": 1, "a;;;b": 1}  # lower-cased, brackets kept


def test_sample_rng_streams_are_independent():
    a = sample_rng(1, 2, 3, 0).random(4)
    assert (a == sample_rng(1, 2, 3, 0).random(4)).all()
    assert not (a == sample_rng(1, 2, 3, 1).random(4)).any()
    assert not (a == sample_rng(1, 2, 4, 0).random(4)).any()
    assert sample_rng(-1, 0, 0, 0).random() == sample_rng(2**64 - 1, 0, 0, 0).random()  # negative seeds work
