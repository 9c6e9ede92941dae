"""Image files: exact round trips for each mode and depth, EXIF orientation, ICC, alpha, errors."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from rcod_core.imageio import LoadedImage, apply_orientation, load_image, save_image

H, W = 9, 13


def _levels(channels, bit_depth, seed=0):
    """Random integer levels as a float image in [0, 1] (exactly representable after rounding)."""
    top = 255 if bit_depth == 8 else 65535
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, top + 1, (1, channels, H, W), generator=g, dtype=torch.int64).double() / top


def _image(mode, bit_depth):
    color = _levels(1 if mode.startswith("L") else 3, bit_depth)
    alpha = _levels(1, bit_depth, seed=1).float() if mode.endswith("A") else None
    gray = mode.startswith("L")
    rgb = color.expand(1, 3, H, W) if gray else color
    return LoadedImage(rgb.float().contiguous(), alpha, gray, bit_depth, None), color, alpha


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("bit_depth", [8, 16])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_round_trip_exact(tmp_path, suffix, bit_depth, mode):
    image, color, alpha = _image(mode, bit_depth)
    path = save_image(tmp_path / f"x{suffix}", image)
    back = load_image(path)
    top = 255 if bit_depth == 8 else 65535
    assert back.bit_depth == bit_depth and back.grayscale == mode.startswith("L")
    assert back.rgb.shape == (1, 3, H, W)
    got = back.rgb[:, :1] if back.grayscale else back.rgb
    assert torch.equal((got.double() * top).round(), (color * top).round())
    if alpha is None:
        assert back.alpha is None
    else:
        assert torch.equal((back.alpha.double() * top).round(), (alpha.double() * top).round())


def test_sixteen_bit_rgb_is_not_truncated(tmp_path):
    image, color, _ = _image("RGB", 16)
    path = save_image(tmp_path / "deep.png", image)
    back = load_image(path)
    assert back.bit_depth == 16
    assert (back.rgb.double() * 65535).round().remainder(257).ne(0).any()  # not 8-bit values scaled up


@pytest.mark.parametrize("orientation,rotated", [(6, True), (8, True), (3, False)])
def test_exif_orientation_applied(tmp_path, orientation, rotated):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    back = load_image(tmp_path / "o.jpg")
    assert back.rgb.shape[-2:] == ((40, 20) if rotated else (20, 40))
    expected = apply_orientation(arr, orientation)
    got = (back.rgb[0].permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(got - expected).mean() < 8  # JPEG loss only


def test_exif_orientation_on_16_bit_png(tmp_path):
    image, color, _ = _image("RGB", 16)
    path = save_image(tmp_path / "d.png", image)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = path.read_bytes()
    from rcod_core.imageio import _png_chunk

    ihdr_end = 8 + 25
    (tmp_path / "r.png").write_bytes(data[:ihdr_end] + _png_chunk(b"eXIf", exif.tobytes()) + data[ihdr_end:])
    back = load_image(tmp_path / "r.png")
    assert back.bit_depth == 16 and back.rgb.shape[-2:] == (W, H)
    expected = apply_orientation(color[0].permute(1, 2, 0).numpy(), 6)
    assert np.allclose(back.rgb[0].permute(1, 2, 0).numpy(), expected, atol=1e-7)


@pytest.mark.parametrize("name,bit_depth", [("a.png", 8), ("b.png", 16), ("c.tif", 16), ("d.jpg", 8), ("e.webp", 8)])
def test_icc_profile_preserved(tmp_path, name, bit_depth):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    image, _, _ = _image("RGB", bit_depth)
    image.icc_profile = icc
    back = load_image(save_image(tmp_path / name, image))
    assert back.icc_profile == icc


def test_jpeg_and_webp_load(tmp_path):
    image, color, _ = _image("RGB", 8)
    for name in ("x.jpg", "x.webp"):
        back = load_image(save_image(tmp_path / name, image))
        assert back.rgb.shape == (1, 3, H, W) and back.bit_depth == 8


def test_corrupt_file_names_it(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ValueError, match="broken.png"):
        load_image(bad)
    half = tmp_path / "half.png"
    good = save_image(tmp_path / "good.png", _image("RGB", 16)[0]).read_bytes()
    half.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="half.png"):
        load_image(half)


def test_save_refuses_nan_unknown_suffix_and_overwrite(tmp_path):
    image, _, _ = _image("RGB", 8)
    bad = LoadedImage(image.rgb.clone(), None)
    bad.rgb[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        save_image(tmp_path / "n.png", bad)
    assert not (tmp_path / "n.png").exists()
    with pytest.raises(ValueError, match="suffix"):
        save_image(tmp_path / "x.xyz", image)
    save_image(tmp_path / "x.png", image)
    with pytest.raises(FileExistsError):
        save_image(tmp_path / "x.png", image)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_to_uint_converts_in_strips_without_touching_its_input(monkeypatch):
    from rcod_core import imageio

    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 37, 23, generator=g, dtype=torch.float64) * 1.2 - 0.1  # out of range on both sides
    before = img.clone()
    monkeypatch.setattr(imageio, "STRIP_ELEMENTS", 3 * 23 * 5)  # 5 rows at a time, the last strip 2 rows
    for bits, scale, dtype in ((8, 255, np.uint8), (16, 65535, np.uint16)):
        ref = (img.clamp(0, 1) * scale).round().permute(1, 2, 0).numpy().astype(dtype)
        got = imageio.to_uint(img, bits)
        assert got.dtype == dtype and got.shape == (37, 23, 3) and np.array_equal(got, ref)
    assert torch.equal(img, before)  # a float64 input is not clamped in place
