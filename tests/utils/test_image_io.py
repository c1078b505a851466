"""utils.image_io: loading any image as upright 8-bit RGB, tensor conversion, atomic PNG writing."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from utils.errors import BadImageError
from utils.image_io import (
    IMAGE_EXTENSIONS,
    list_images,
    load_image,
    load_image_tensor,
    pil_to_tensor,
    save_png,
    tensor_to_uint8,
    to_pil,
)


def _pattern(h: int = 12, w: int = 10) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_rgb_png_roundtrip(tmp_path):
    arr = _pattern()
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB" and img.size == (10, 12)
    np.testing.assert_array_equal(np.asarray(img), arr)


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red channel
    rgba[0, 0, 3] = 0  # fully transparent → white
    rgba[1, 1, 3] = 255  # opaque → (200, 0, 0)
    rgba[2, 2, 3] = 128  # half → 200·a + 255·(1−a) etc.
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
    out = np.asarray(load_image(tmp_path / "t.png")).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[1, 1].tolist() == [200, 0, 0]
    a = 128 / 255
    np.testing.assert_allclose(out[2, 2], [200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a)], atol=1.01)


def test_la_and_palette_transparency(tmp_path):
    la = np.zeros((3, 3, 2), dtype=np.uint8)
    la[..., 0] = 50
    la[..., 1] = 255
    la[0, 0, 1] = 0
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    out = np.asarray(load_image(tmp_path / "la.png"))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [50, 50, 50]

    p = Image.new("P", (3, 3), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    p.putpixel((0, 0), 0)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(load_image(tmp_path / "p.png"))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[1, 1].tolist() == [10, 20, 30]
    p.save(tmp_path / "p.gif")
    assert np.asarray(load_image(tmp_path / "p.gif"))[2, 2].tolist() == [10, 20, 30]


def test_greyscale_and_16bit(tmp_path):
    g = (np.arange(120).reshape(12, 10) * 2).astype(np.uint8)
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    out = np.asarray(load_image(tmp_path / "g.png"))
    assert out.shape == (12, 10, 3)
    np.testing.assert_array_equal(out[..., 1], g)

    g16 = (np.arange(120).reshape(12, 10) * 500).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    out = np.asarray(load_image(tmp_path / "g16.png"))
    np.testing.assert_array_equal(out[..., 0], np.round(g16 / 257).astype(np.uint8))

    # 16-bit RGB PNG written by hand (PIL cannot write one).
    a = (np.arange(12 * 10 * 3).reshape(12, 10, 3) * 181).astype(np.uint16)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + a[r].astype(">u2").tobytes() for r in range(12))
    png = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10, 12, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    (tmp_path / "rgb16.png").write_bytes(png)
    out = np.asarray(load_image(tmp_path / "rgb16.png")).astype(int)
    assert out.shape == (12, 10, 3)
    assert np.abs(out - a / 257).max() <= 1.0


def test_16bit_rgb_tiff(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    a = (np.arange(6 * 5 * 3).reshape(6, 5, 3) * 700).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", a)
    out = np.asarray(load_image(tmp_path / "a.tif")).astype(int)
    assert out.shape == (6, 5, 3)
    assert np.abs(out - a / 257).max() <= 1.0


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_applied(tmp_path, orientation):
    upright = _pattern(12, 10)
    # What a camera stores for each orientation tag (the inverse of the display transform).
    stored = {3: np.rot90(upright, 2), 6: np.rot90(upright, 1), 8: np.rot90(upright, -1)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / "r.png", exif=exif.tobytes())
    out = np.asarray(load_image(tmp_path / "r.png"))
    np.testing.assert_array_equal(out, upright)


def test_bad_files_raise_named_error(tmp_path):
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(BadImageError, match="corrupt.jpg"):
        load_image(tmp_path / "corrupt.jpg")
    with pytest.raises(BadImageError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    Image.fromarray(_pattern(64, 64)).save(tmp_path / "full.png")
    (tmp_path / "trunc.png").write_bytes((tmp_path / "full.png").read_bytes()[:200])
    with pytest.raises(BadImageError, match="trunc.png"):
        load_image(tmp_path / "trunc.png")


def test_tensor_conversions():
    arr = _pattern()
    t = pil_to_tensor(Image.fromarray(arr))
    assert t.shape == (1, 3, 12, 10) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    np.testing.assert_array_equal(tensor_to_uint8(t), arr)
    np.testing.assert_array_equal(tensor_to_uint8(t[0]), arr)
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, 0.5]).view(1, 1, 6).expand(3, 1, 6)
    out = tensor_to_uint8(x)[0, :, 0].tolist()
    assert out == [0, 0, round(127.5), 255, 255, round(1.5 * 127.5)]
    with pytest.raises(ValueError):
        tensor_to_uint8(torch.zeros(2, 3, 4, 4))


def test_load_image_tensor_resizes_only_when_needed(tmp_path):
    """The one load-and-resize: upright RGB, bicubic by default (LANCZOS on request), [-1,1], 1×3×R×R."""
    arr = _pattern(12, 10)
    Image.fromarray(arr, "RGB").convert("LA").save(tmp_path / "grey.png")  # converted like load_image does
    Image.fromarray(arr, "RGB").save(tmp_path / "a.png")
    same = load_image_tensor(tmp_path / "a.png")
    assert same.shape == (1, 3, 12, 10) and same.dtype == torch.float32
    assert torch.equal(same, pil_to_tensor(Image.fromarray(arr)))
    assert torch.equal(load_image_tensor(tmp_path / "a.png", None), same)
    for resample in (Image.Resampling.BICUBIC, Image.Resampling.LANCZOS):
        x = load_image_tensor(tmp_path / "a.png", 8, *([resample] if resample != Image.Resampling.BICUBIC else []))
        assert x.shape == (1, 3, 8, 8)  # non-square sources are stretched, not cropped
        assert torch.equal(x, pil_to_tensor(Image.fromarray(arr).resize((8, 8), resample)))
    assert not torch.equal(load_image_tensor(tmp_path / "a.png", 8, Image.Resampling.LANCZOS),
                           load_image_tensor(tmp_path / "a.png", 8))
    grey = load_image_tensor(tmp_path / "grey.png", 12)
    assert grey.shape == (1, 3, 12, 12) and torch.equal(grey[0, 0], grey[0, 2])
    with pytest.raises(BadImageError, match="missing.png"):
        load_image_tensor(tmp_path / "missing.png", 8)


def test_save_png_atomic_and_inputs(tmp_path):
    arr = _pattern()
    t = pil_to_tensor(Image.fromarray(arr))
    for i, image in enumerate([arr, t, t[0], Image.fromarray(arr), torch.from_numpy(arr)]):
        path = save_png(tmp_path / "sub" / f"x{i}.png", image)
        np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), arr)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [f"x{i}.png" for i in range(5)]
    # overwrite in place
    save_png(tmp_path / "sub" / "x0.png", arr[::-1].copy(), compress_level=9)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "sub" / "x0.png")), arr[::-1])
    with pytest.raises(ValueError):
        to_pil(arr.astype(np.float32))


def test_list_images(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.txt", ".hidden.png", "d.webp"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "d.webp"]
    assert ".png" in IMAGE_EXTENSIONS and ".jpeg" in IMAGE_EXTENSIONS
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "nope")
