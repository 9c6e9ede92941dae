"""Colour fixes: AdaIN moments, wavelet low-frequency transfer, mode dispatch."""

import pytest
import torch

from rcod_core.colour import adain_color_fix, color_fix, wavelet_color_fix, wavelet_decomposition


def _images(shape=(2, 3, 40, 52), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g)


def test_adain_matches_source_moments():
    target = _images(seed=0) * 0.5 + 0.2
    source = _images(seed=1) * 0.4 + 0.3
    out = adain_color_fix(target, source)
    flat_o, flat_s = out.flatten(2), source.flatten(2)
    assert torch.allclose(flat_o.mean(-1), flat_s.mean(-1), atol=1e-4)
    assert torch.allclose(flat_o.std(-1), flat_s.std(-1), atol=1e-3)


def test_wavelet_constant_offset_returns_source():
    # a constant offset lives entirely in the low band: target = source + 0.1 gives back source
    source = _images() * 0.8
    out = wavelet_color_fix(source + 0.1, source)
    assert (out - source).abs().max() < 1e-5


def test_wavelet_decomposition_is_a_partition():
    image = _images()
    high, low = wavelet_decomposition(image, levels=5)
    assert torch.allclose(high + low, image, atol=1e-6)
    assert low.std() < image.std()


def test_source_resized_to_target():
    target, source = _images((1, 3, 64, 48)), _images((1, 3, 16, 12), seed=3)
    for mode in ("adain", "wavelet"):
        assert color_fix(target, source, mode).shape == target.shape


def test_none_is_identity_and_bad_mode():
    target, source = _images(), _images(seed=1)
    assert color_fix(target, source, "none") is target
    with pytest.raises(ValueError, match="color fix mode"):
        color_fix(target, source, "histogram")
    with pytest.raises(ValueError, match="levels"):
        wavelet_decomposition(target, levels=0)


@pytest.mark.parametrize("rows", [32, 45, 200])
def test_in_place_fixes_equal_the_whole_image_ones(rows):
    # strips of `rows` rows (200: one strip) with the blurs' 31-row reach as context: the same result
    target, source = _images((2, 3, 150, 37), seed=4), _images((2, 3, 150, 37), seed=5)
    whole = wavelet_color_fix(target, source)
    strips = target.clone()
    assert wavelet_color_fix(strips, source, in_place=True, strip_rows=rows) is strips
    assert (strips - whole).abs().max() < 1e-6
    wrong_margin = target.clone()
    from rcod_core import colour

    for y0 in range(0, 150, rows):  # strips without context: visibly different near their edges
        wrong_margin[..., y0 : y0 + rows, :] = colour._wavelet_mix(target[..., y0 : y0 + rows, :],
                                                                   source[..., y0 : y0 + rows, :], 5)
    assert rows >= 150 or (wrong_margin - whole).abs().max() > 1e-3
    adain = target.clone()
    assert torch.equal(color_fix(adain, source, "adain", in_place=True), adain_color_fix(target, source))
    with pytest.raises(ValueError, match="strip_rows"):
        wavelet_color_fix(target.clone(), source, in_place=True, strip_rows=31)


def test_in_place_wavelet_with_its_own_source_and_memory_flat_in_height():
    from rcod_core.memprobe import peak_bytes

    image = _images((1, 3, 400, 64), seed=6)
    expected = wavelet_color_fix(image, image)
    same = image.clone()
    assert (wavelet_color_fix(same, same, in_place=True, strip_rows=64) - expected).abs().max() < 1e-6
    peaks = {}
    for h in (400, 1600):
        target, source = _images((1, 3, h, 64), seed=7), _images((1, 3, h, 64), seed=8)
        peaks[h] = peak_bytes(lambda: wavelet_color_fix(target, source, in_place=True, strip_rows=64))
        assert peak_bytes(lambda: wavelet_color_fix(target, source)) > 4 * target.numel() * 4
    assert peaks[1600] == peaks[400]  # strip-sized temporaries only: the same for a 4x taller image
