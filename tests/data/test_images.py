import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from library.data.images import MAX_IMAGE_PIXELS, load_image, probe_image
from library.errors import DatasetError


def _px(img, xy):
    return img.getpixel(xy)


def test_rgba_is_composited_on_white(tmp_path):
    arr = np.zeros((64, 64, 4), dtype=np.uint8)
    arr[:, :32] = (255, 0, 0, 128)  # half-transparent red
    arr[:, 32:48] = (0, 0, 255, 0)  # fully transparent blue
    arr[:, 48:] = (0, 255, 0, 255)  # opaque green
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB" and img.size == (64, 64)
    # alpha a=128/255 over white: c*a + 255*(1-a)
    expected = round(255 * (1 - 128 / 255))
    r, g, b = _px(img, (0, 0))
    assert r == 255 and abs(g - expected) <= 1 and abs(b - expected) <= 1
    assert _px(img, (40, 0)) == (255, 255, 255)
    assert _px(img, (60, 0)) == (0, 255, 0)


def test_la_and_palette_with_transparency_on_white(tmp_path):
    la = np.zeros((64, 64, 2), dtype=np.uint8)
    la[:, :32] = (100, 255)
    la[:, 32:] = (0, 0)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    img = load_image(tmp_path / "la.png")
    assert _px(img, (0, 0)) == (100, 100, 100)
    assert _px(img, (63, 0)) == (255, 255, 255)

    p = Image.new("P", (64, 64), 0)
    p.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    p.paste(1, (0, 0, 32, 64))
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    img = load_image(tmp_path / "p.png")
    assert _px(img, (0, 0)) == (200, 0, 0)
    assert _px(img, (63, 0)) == (255, 255, 255)  # palette index 0 is transparent


def test_palette_grayscale_and_cmyk_convert_to_rgb(tmp_path):
    p = Image.new("P", (64, 64), 1)
    p.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    p.save(tmp_path / "p.png")
    assert _px(load_image(tmp_path / "p.png"), (5, 5)) == (12, 34, 56)

    Image.new("L", (64, 64), 77).save(tmp_path / "l.png")
    assert _px(load_image(tmp_path / "l.png"), (5, 5)) == (77, 77, 77)

    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(tmp_path / "c.tif")
    assert _px(load_image(tmp_path / "c.tif"), (5, 5)) == (255, 0, 0)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.zeros((64, 64), dtype=np.uint16)
    arr[:, :16] = 65535
    arr[:, 16:32] = 32896  # 128 * 257
    arr[:, 32:48] = 1000  # 8-bit clipping would make this 255
    Image.fromarray(arr).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode.startswith("I")  # really stored as 16-bit
    img = load_image(tmp_path / "g16.png")
    assert _px(img, (0, 0)) == (255, 255, 255)
    assert _px(img, (20, 0)) == (128, 128, 128)
    assert _px(img, (40, 0)) == (4, 4, 4)  # 1000 / 257 = 3.9
    assert _px(img, (60, 0)) == (0, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((64, 96, 3), dtype=np.uint8)  # 96 wide, 64 tall: left red, right blue
    arr[:, :48] = (255, 0, 0)
    arr[:, 48:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    img = load_image(tmp_path / "rot.jpg")
    assert img.size == (64, 96)
    assert probe_image(tmp_path / "rot.jpg") == (64, 96)
    top, bottom = np.asarray(img)[5, 32], np.asarray(img)[90, 32]
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_huge_jpeg_is_downscaled_while_decoding(tmp_path):
    img = Image.new("L", (12000, 9000), 90)
    img.paste(200, (0, 0, 6000, 9000))
    img.save(tmp_path / "huge.jpg", quality=50)
    del img
    assert probe_image(tmp_path / "huge.jpg") == (12000, 9000)
    out = load_image(tmp_path / "huge.jpg", max_pixels=1_000_000)
    assert out.width * out.height <= 1_000_000
    assert abs(out.width / out.height - 12000 / 9000) < 0.01
    assert abs(out.getpixel((10, 10))[0] - 200) <= 3 and abs(out.getpixel((out.width - 10, 10))[0] - 90) <= 3
    # cover: decode only as much as the bucket needs, but never less than it
    covered = load_image(tmp_path / "huge.jpg", cover=(512, 384))
    assert covered.width >= 512 and covered.height >= 384 and covered.width <= 2 * 1500


def test_huge_png_is_reduced(tmp_path):
    Image.new("L", (12000, 9000), 33).save(tmp_path / "huge.png", compress_level=1)
    out = load_image(tmp_path / "huge.png", max_pixels=2_000_000)
    assert out.width * out.height <= 2_000_000 and out.getpixel((0, 0)) == (33, 33, 33)
    covered = load_image(tmp_path / "huge.png", cover=(640, 480))
    assert covered.width >= 640 and covered.height >= 480 and covered.width < 12000 // 4


def test_decompression_bomb_header_is_a_dataset_error(tmp_path):
    # a valid tiny PNG whose header claims 30000x30000 (900 MP): rejected from the header, nothing decoded
    Image.new("L", (1, 1)).save(tmp_path / "small.png")
    data = bytearray((tmp_path / "small.png").read_bytes())
    ihdr = struct.pack(">II", 30000, 30000) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    (tmp_path / "bomb.png").write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"bomb\.png.*megapixels") as err:
        load_image(tmp_path / "bomb.png")
    assert str(2 * MAX_IMAGE_PIXELS // 1_000_000) in str(err.value)


def test_tiny_image_is_rejected_with_size_and_minimum(tmp_path):
    Image.new("RGB", (20, 30)).save(tmp_path / "tiny.png")
    with pytest.raises(DatasetError, match=r"tiny\.png is 20x30 px.*at least 64 px"):
        load_image(tmp_path / "tiny.png")
    assert load_image(tmp_path / "tiny.png", min_side=16).size == (20, 30)


def test_corrupt_truncated_and_missing_files_name_the_file(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really" + bytes(range(200)))
    with pytest.raises(DatasetError, match=r"junk\.png cannot be decoded"):
        load_image(tmp_path / "junk.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"trunc\.png cannot be decoded"):
        load_image(tmp_path / "trunc.png")
    with pytest.raises(DatasetError, match=r"trunc\.png cannot be decoded"):
        probe_image(tmp_path / "trunc.png")  # validation catches it, not the first training step
    with pytest.raises(DatasetError, match=r"gone\.png: file not found"):
        load_image(tmp_path / "gone.png")


def test_non_ascii_file_name(tmp_path):
    path = tmp_path / "猫の写真.png"
    Image.new("RGB", (64, 80), (1, 2, 3)).save(path)
    assert probe_image(path) == (64, 80)
    assert _px(load_image(path), (0, 0)) == (1, 2, 3)
