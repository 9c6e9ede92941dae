"""Sub-pixel upsampling: the same function as nearest ×2 + 3×3 convolution (against a float64
reference), the same parameters and keys, only eligible blocks switched, on by default in the
pipeline and switchable."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D

from rcod_core.upsample import (SubpixelUpsample2D, subpixel_blocks, subpixel_kernel, upsample_conv,
                                use_subpixel_upsampling)


def _reference(x, w, b):
    return F.conv2d(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"), w.double(),
                    None if b is None else b.double(), padding=1)


@pytest.mark.parametrize("shape,out_ch,bias,layout", [
    ((2, 5, 7, 11), 6, True, torch.contiguous_format),
    ((1, 8, 6, 6), 8, False, torch.channels_last),
    ((1, 3, 1, 9), 4, True, torch.channels_last),
])
def test_upsample_conv_is_nearest_upsampling_then_a_3x3_convolution(shape, out_ch, bias, layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).contiguous(memory_format=layout)
    w = torch.randn(out_ch, shape[1], 3, 3, generator=g)
    b = torch.randn(out_ch, generator=g) if bias else None
    out = upsample_conv(x, w, b)
    ref = _reference(x, w, b)
    assert out.shape == ref.shape == (shape[0], out_ch, 2 * shape[2], 2 * shape[3])
    assert (out.double() - ref).abs().max() < 1e-5 * ref.abs().max()
    assert out.is_contiguous(memory_format=layout)
    assert not torch.equal(upsample_conv(x, w.flip(-1), b), out)  # the taps are not symmetric in the test


def test_subpixel_kernel_sums_the_taps_each_phase_sees():
    w = torch.arange(9.0).reshape(1, 1, 3, 3)  # rows (0 1 2), (3 4 5), (6 7 8)
    k = subpixel_kernel(w)
    assert k.shape == (4, 1, 2, 2)
    # phase (0, 0): input rows (-1, 0) get kernel rows (0, 1 + 2), the same along columns
    assert k[0, 0].tolist() == [[0.0, 1.0 + 2.0], [3.0 + 6.0, 4.0 + 5.0 + 7.0 + 8.0]]
    assert k[3, 0].tolist() == [[0.0 + 1.0 + 3.0 + 4.0, 2.0 + 5.0], [6.0 + 7.0, 8.0]]
    assert k.sum(dim=(-2, -1)).tolist() == [[36.0]] * 4  # every phase sees every tap once
    with pytest.raises(ValueError, match="3, 3"):
        subpixel_kernel(torch.zeros(1, 1, 2, 2))


def test_gradients_match_the_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    upsample_conv(x, w).pow(2).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    _reference(x, w, None).pow(2).sum().backward()
    assert torch.allclose(gx, x.grad) and torch.allclose(gw, w.grad)


@pytest.fixture()
def vae():
    from rcod_core.models import build_models

    return build_models("tiny", seed=0, with_clip=False).vae.eval()


def test_decoder_switches_keep_weights_and_output(vae):
    z = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(2))
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    with torch.no_grad():
        before = vae.decode(z).sample
        assert use_subpixel_upsampling(vae.decoder) == 3 == subpixel_blocks(vae)  # the tiny decoder's three
        after = vae.decode(z).sample
    assert vae.state_dict().keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in vae.state_dict().items())
    assert (after - before).abs().max() < 1e-5 * before.abs().max()
    assert use_subpixel_upsampling(vae.decoder) == 3  # idempotent
    clone = pickle.loads(pickle.dumps(copy.deepcopy(vae)))
    assert subpixel_blocks(clone) == 3
    with torch.no_grad():
        assert torch.equal(clone.decode(z).sample, after)
    assert use_subpixel_upsampling(vae.decoder, False) == 0
    assert all(type(m) is Upsample2D for m in vae.decoder.modules() if isinstance(m, Upsample2D))


def test_only_eligible_blocks_switch_and_other_sizes_fall_back():
    plain = Upsample2D(4, use_conv=True)
    transposed = Upsample2D(4, use_conv_transpose=True)
    no_conv = Upsample2D(4, use_conv=False)
    wrapped = Upsample2D(4, use_conv=True)
    wrapped.conv = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1))  # e.g. an adapter around it
    root = torch.nn.ModuleList([plain, transposed, no_conv, wrapped])
    assert use_subpixel_upsampling(root) == 1 and type(plain) is SubpixelUpsample2D
    x = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        odd = plain(x, output_size=(9, 13))  # not 2x: diffusers' own interpolation to that size
        assert odd.shape == (1, 4, 9, 13)
        assert torch.allclose(odd, plain.conv(F.interpolate(x, size=(9, 13), mode="nearest")))
        assert torch.allclose(plain(x, output_size=(10, 14)), plain(x), atol=0)
    with pytest.raises(ValueError, match="expected 4 channels"):
        plain(torch.randn(1, 3, 5, 5))


def test_the_pipeline_decodes_in_sub_pixel_form_by_default():
    from rcod_core.testing.tiny import tiny_pipeline

    pipe = tiny_pipeline("rcod_o", seed=0)
    assert subpixel_blocks(pipe.vae.decoder) == 3 and subpixel_blocks(pipe.unet) == 0
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    fast = pipe(lr, realism=500)
    plain = pipe.set_subpixel_upsampling(False)(lr, realism=500)
    assert subpixel_blocks(pipe.vae) == 0
    assert (fast - plain).abs().max() < 1e-5
