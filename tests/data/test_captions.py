import pytest

from library.data.captions import (
    CaptionOptions,
    find_caption_file,
    process_caption,
    read_caption,
    sample_rng,
    static_caption,
    tag_frequency,
)
from library.errors import DatasetError

TAGS = "zkw, red, heart, checkered, small, top left, blue background"


def _process(caption, opts, seed=0, epoch=0, index=0):
    return process_caption(caption, opts, sample_rng(seed, epoch, index, 0), epoch)


def test_caption_file_discovery(tmp_path):
    img = tmp_path / "a.b.png"
    assert find_caption_file(img, None) is None
    (tmp_path / "a.b.txt").write_text("txt")
    assert find_caption_file(img, None) == tmp_path / "a.b.txt"  # stem keeps inner dots
    (tmp_path / "a.b.caption").write_text("cap")
    assert find_caption_file(img, None) == tmp_path / "a.b.caption"  # .caption wins when not told
    assert find_caption_file(img, ".txt") == tmp_path / "a.b.txt"
    assert find_caption_file(img, ".tags") is None  # an explicit extension is the only one tried


def test_read_caption_utf8_bom_cjk_and_first_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("\ufeff\n  猫, 写真, かわいい  \nsecond line\n".encode())
    assert read_caption(path) == "猫, 写真, かわいい"
    path.write_bytes(b"   \n\n")
    assert read_caption(path) == ""


def test_invalid_utf8_names_file_and_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"caf\xe9 au lait")  # Latin-1 e-acute
    with pytest.raises(DatasetError, match=r"bad\.txt is not valid UTF-8 \(byte 0xe9 at offset 3\); re-save it as UTF-8"):
        read_caption(path)


def test_no_options_returns_caption_unchanged():
    assert _process(TAGS, CaptionOptions()) == TAGS


def test_shuffle_keeps_first_tokens_and_permutes_the_rest():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=2)
    tags = [t.strip() for t in TAGS.split(",")]
    seen = set()
    for epoch in range(20):
        out = [t.strip() for t in _process(TAGS, opts, epoch=epoch).split(",")]
        assert out[:2] == tags[:2]
        assert sorted(out) == sorted(tags)
        seen.add(tuple(out))
    assert len(seen) > 10  # 5! orders: epochs really reshuffle


def test_shuffle_is_deterministic_in_seed_epoch_index():
    opts = CaptionOptions(shuffle_caption=True)
    a = [_process(TAGS, opts, seed=7, epoch=e, index=i) for e in range(3) for i in range(5)]
    b = [_process(TAGS, opts, seed=7, epoch=e, index=i) for e in range(3) for i in range(5)]
    c = [_process(TAGS, opts, seed=8, epoch=e, index=i) for e in range(3) for i in range(5)]
    assert a == b and a != c


def test_caption_dropout_rate_matches_probability():
    opts = CaptionOptions(caption_dropout_rate=0.3)
    n = 4000
    dropped = sum(_process(TAGS, opts, index=i) == "" for i in range(n))
    sigma = (n * 0.3 * 0.7) ** 0.5
    assert abs(dropped - 0.3 * n) < 4 * sigma
    assert all(_process(TAGS, CaptionOptions(caption_dropout_rate=1.0), index=i) == "" for i in range(20))


def test_caption_dropout_every_n_epochs():
    opts = CaptionOptions(caption_dropout_every_n_epochs=3)
    assert [_process(TAGS, opts, epoch=e) == "" for e in range(7)] == [True, False, False, True, False, False, True]


def test_tag_dropout_never_drops_kept_tokens():
    assert _process(TAGS, CaptionOptions(caption_tag_dropout_rate=1.0, keep_tokens=1)) == "zkw"
    opts = CaptionOptions(caption_tag_dropout_rate=0.5)
    kept = sum(len(_process(TAGS, opts, index=i).split(",")) for i in range(400))
    assert 0.4 * 7 * 400 < kept < 0.6 * 7 * 400


def test_keep_tokens_separator_fixes_head_and_tail_and_disappears():
    caption = "zkw, 1girl ||| red, blue, green, white ||| masterpiece"
    opts = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||")
    for epoch in range(5):
        out = [t.strip() for t in _process(caption, opts, epoch=epoch).split(",")]
        assert out[:2] == ["zkw", "1girl"] and out[-1] == "masterpiece"
        assert sorted(out[2:-1]) == ["blue", "green", "red", "white"]
    # also removed when nothing is shuffled
    assert _process(caption, CaptionOptions(keep_tokens_separator="|||")) == "zkw, 1girl, red, blue, green, white, masterpiece"
    assert static_caption(caption, CaptionOptions(keep_tokens_separator="|||")).count("|") == 0


def test_secondary_separator_keeps_tags_together():
    caption = "a, b;;;c, d, e"
    opts = CaptionOptions(shuffle_caption=True, secondary_separator=";;;")
    for epoch in range(10):
        out = [t.strip() for t in _process(caption, opts, epoch=epoch).split(",")]
        i = out.index("b")
        assert out[i + 1] == "c"


def test_prefix_and_suffix_stay_outside_the_shuffle():
    opts = CaptionOptions(shuffle_caption=True, caption_prefix="zkw,", caption_suffix=", best quality")
    for epoch in range(5):
        out = _process("red, blue, green", opts, epoch=epoch)
        assert out.startswith("zkw, ") and out.endswith(", best quality")
    assert static_caption("x", opts) == "zkw, x , best quality"


def test_tag_frequency_counts_like_sd_scripts():
    freq = tag_frequency(["zkw, (red), heart", "zkw,  blue ,heart", ""])
    assert freq == {"zkw": 2, "red": 1, "heart": 2, "blue": 1}


def test_sample_rng_streams_are_independent():
    a = sample_rng(1, 2, 3, 0).random(4)
    assert (a == sample_rng(1, 2, 3, 0).random(4)).all()
    assert not (a == sample_rng(1, 2, 3, 1).random(4)).any()
    assert not (a == sample_rng(1, 2, 4, 0).random(4)).any()
    assert sample_rng(-1, 0, 0, 0).random() == sample_rng(2**64 - 1, 0, 0, 0).random()  # negative seeds work
