import pytest
import torch

from rcod_core.models import build_models
from rcod_core.prompting import CLIP_MEAN, CLIP_STD, VisualPromptEncoder, preprocess_for_clip


def test_real_clip_config_token_shape_on_meta():
    base = build_models("sd21_base", device="meta")
    assert base.unet.config.cross_attention_dim == 1024
    with torch.device("meta"):
        enc = VisualPromptEncoder(base.clip_vision, base.unet.config.cross_attention_dim)
        tokens = enc(torch.rand(2, 3, 128, 96))
    assert tuple(tokens.shape) == (2, 257, 1024)
    assert enc.num_tokens == 257 and enc.hidden_size == 1024


@pytest.fixture(scope="module")
def tiny_encoder():
    base = build_models("tiny", seed=0)
    torch.manual_seed(0)
    return VisualPromptEncoder(base.clip_vision, base.unet.config.cross_attention_dim).eval()


def test_tiny_tokens_and_official_vs_normalized(tiny_encoder):
    x = torch.rand(2, 3, 40, 50, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        official = tiny_encoder(x)
        normalized = tiny_encoder(x, preprocess="normalized")
    assert official.shape == (2, 257, 32)
    assert not torch.allclose(official, normalized, atol=1e-3)


def test_preprocessing_values():
    x = torch.full((1, 3, 30, 30), 0.25)
    off = preprocess_for_clip(x, "official")
    assert off.shape == (1, 3, 224, 224)
    assert torch.allclose(off, torch.full_like(off, -0.5), atol=1e-6)  # [0,1] -> [-1,1], no mean/std
    norm = preprocess_for_clip(x, "normalized")
    expected = (0.25 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(norm[0, :, 100, 100], expected, atol=1e-5)
    with pytest.raises(ValueError, match="preprocess mode"):
        preprocess_for_clip(x, "imagenet")


def test_tokens_equal_projection_of_last_hidden_state(tiny_encoder):
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pix = preprocess_for_clip(x, "official")
        hidden = tiny_encoder.vision_model(pixel_values=pix).last_hidden_state  # before post_layernorm
        expected = hidden @ tiny_encoder.projection.weight.T + tiny_encoder.projection.bias
        assert torch.allclose(tiny_encoder(x), expected, atol=1e-5)


def test_negative_tokens_cached_and_invalidated(tiny_encoder, monkeypatch):
    calls = []
    original = tiny_encoder.tokens_from_clip_input

    def counting(pixel_values):
        calls.append(pixel_values.shape)
        return original(pixel_values)

    monkeypatch.setattr(tiny_encoder, "tokens_from_clip_input", counting)
    tiny_encoder._negative_cache.clear()
    a = tiny_encoder.negative_tokens(3)
    b = tiny_encoder.negative_tokens(5)
    assert len(calls) == 1, "negative tokens must be computed once"
    assert a.shape == (3, 257, 32) and b.shape == (5, 257, 32)
    assert torch.equal(a[0], b[4])
    with torch.no_grad():
        zero_input = torch.zeros(1, 3, 224, 224)
        assert torch.allclose(a[:1], original(zero_input), atol=1e-6)
        tiny_encoder.projection.bias.add_(1.0)  # weights change -> recompute
    c = tiny_encoder.negative_tokens(1)
    assert len(calls) == 2
    assert torch.allclose(c, a[:1] + 1.0, atol=1e-5)
    with torch.no_grad():
        tiny_encoder.projection.bias.sub_(1.0)


def test_bad_shape(tiny_encoder):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny_encoder(torch.rand(1, 4, 32, 32))
