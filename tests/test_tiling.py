"""Tiling: grid coverage, blend weights, tiled == untiled for pointwise fns, tiled VAE with frozen
GroupNorm statistics on the tiny VAE, memory plans."""

import math

import pytest
import torch
import torch.nn.functional as F

from rcod_core import tiling
from rcod_core.memory import TilePlan, choose_tile
from rcod_core.progress import Cancelled
from rcod_core.tiling import gaussian_weights, tile_grid, tile_starts, tiled_apply
from rcod_core.vae_tiling import tiled_decode, tiled_encode


def _coverage(h, w, boxes):
    count = torch.zeros(h, w, dtype=torch.int64)
    for y0, y1, x0, x1 in boxes:
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
        count[y0:y1, x0:x1] += 1
    return count


# -- grid ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w,tile,overlap", [(64, 64, 24, 8), (37, 101, 16, 5), (10, 7, 32, 8), (96, 97, 96, 32), (50, 50, 7, 0)])
def test_grid_covers_exactly(h, w, tile, overlap):
    boxes = tile_grid(h, w, tile, overlap)
    assert (_coverage(h, w, boxes) >= 1).all()
    sizes = {(y1 - y0, x1 - x0) for y0, y1, x0, x1 in boxes}
    assert sizes == {(min(tile, h), min(tile, w))}  # one tile size, the last tile flush with the end
    starts = tile_starts(w, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, w) == w
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # at least `overlap` overlap
    assert tiling.count_tiles(h, w, tile, overlap, batch=2) == 2 * len(boxes)


def test_owned_boxes_partition():
    h, w, tile, overlap = 45, 70, 16, 6
    owned = tiling.owned_boxes(h, w, tile, overlap)
    count = _coverage(h, w, [(y0 + a, y0 + b, x0 + c, x0 + d) for (y0, _, x0, _), (a, b, c, d) in owned.items()])
    assert (count == 1).all()


@pytest.mark.parametrize("tile,overlap,name", [(0, 0, "tile"), (8, 8, "overlap"), (8, -1, "overlap"), (8.0, 2, "tile")])
def test_grid_validation(tile, overlap, name):
    with pytest.raises(ValueError, match=name):
        tile_starts(100, tile, overlap)


# -- weights ---------------------------------------------------------------------------------------
def test_gaussian_weights_formula():
    th, tw = 12, 20
    wts = gaussian_weights(th, tw)
    var = 0.01
    ref_x = [math.exp(-((x - (tw - 1) / 2) ** 2) / tw**2 / (2 * var)) / math.sqrt(2 * math.pi * var) for x in range(tw)]
    ref_y = [math.exp(-((y - (th - 1) / 2) ** 2) / th**2 / (2 * var)) / math.sqrt(2 * math.pi * var) for y in range(th)]
    assert torch.allclose(wts, torch.outer(torch.tensor(ref_y), torch.tensor(ref_x)).float(), rtol=1e-6)
    assert (wts > 0).all() and torch.equal(wts, wts.flip(0).flip(1))


# -- tiled_apply -----------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w,tile,overlap,batch_tiles", [(37, 53, 16, 6, 3), (64, 64, 24, 8, 4), (20, 90, 32, 8, 1)])
def test_tiled_pointwise_equals_untiled(h, w, tile, overlap, batch_tiles):
    x = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(0))
    calls = []

    def fn(tiles, boxes):
        assert tiles.shape[0] == len(boxes) <= batch_tiles
        calls.append(len(boxes))
        return torch.cat([tiles * 2 + 1, tiles[:, :1] ** 2], dim=1)  # pointwise, C' = 5

    out = tiled_apply(fn, x, tile, overlap, batch_tiles=batch_tiles)
    expected = torch.cat([x * 2 + 1, x[:, :1] ** 2], dim=1)
    assert out.shape == expected.shape
    assert (out - expected).abs().max() < 1e-5 * expected.abs().max()
    assert sum(calls) == 2 * len(tile_grid(h, w, tile, overlap))


def test_single_tile_runs_once_on_whole_tensor():
    x = torch.randn(3, 4, 20, 30)
    seen = []
    out = tiled_apply(lambda t, boxes: seen.append((t.shape, boxes)) or t.flip(-1), x, tile=32, overlap=8)
    assert torch.equal(out, x.flip(-1))  # not pointwise: exact only because it is one call
    assert seen == [(x.shape, [(0, 20, 0, 30)] * 3)]


def test_progress_and_cancel():
    x = torch.randn(1, 4, 40, 40)
    reports = []
    tiled_apply(lambda t, b: t, x, 16, 4, batch_tiles=2, progress=lambda d, n: reports.append((d, n)))
    total = len(tile_grid(40, 40, 16, 4))
    assert reports[-1] == (total, total) and all(n == total for _, n in reports)
    assert [d for d, _ in reports] == sorted(d for d, _ in reports)
    with pytest.raises(Cancelled):
        tiled_apply(lambda t, b: t, x, 16, 4, batch_tiles=2, cancel=lambda: len(reports) > 3,
                    progress=lambda d, n: reports.append((d, n)))


def _reference_blend(fn, x, tile, overlap):
    """Σ_k w_k f_k / Σ_k w_k with a per-pixel weight map, tile by tile in float64 (no separability)."""
    h, w = x.shape[-2:]
    boxes = tile_grid(h, w, tile, overlap)
    acc = torch.zeros(x.shape[0], 3, h, w, dtype=torch.float64)
    wsum = torch.zeros(h, w, dtype=torch.float64)
    y0, y1, x0, x1 = boxes[0]
    wts = gaussian_weights(y1 - y0, x1 - x0, dtype=torch.float64)
    for a, b, c, d in boxes:
        acc[..., a:b, c:d] += fn(x[..., a:b, c:d], [(a, b, c, d)] * x.shape[0]).double() * wts
        wsum[a:b, c:d] += wts
    return acc / wsum


@pytest.mark.parametrize("h,w,tile,overlap", [(37, 53, 16, 6), (64, 40, 24, 8)])
def test_tiled_blend_of_a_non_pointwise_fn_matches_a_per_pixel_weight_sum(h, w, tile, overlap):
    # the blend divides by one weight sum per row and one per column: equal to Σ w per pixel on a grid
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))

    def fn(tiles, boxes):  # depends on the whole tile: each tile's result differs where tiles overlap
        return tiles - tiles.mean(dim=(-2, -1), keepdim=True) + tiles.flip(-1) * 0.5

    out = tiled_apply(fn, x, tile, overlap, batch_tiles=3)
    ref = _reference_blend(fn, x, tile, overlap)
    assert out.dtype == torch.float32 and (out.double() - ref).abs().max() < 1e-5
    assert (out - fn(x, None)).abs().max() > 0.1  # the tiles really disagree: the blend is what is tested


def test_blend_of_boxes_off_a_grid_still_normalises():
    # boxes that are not a product of row and column spans take the per-pixel weight sum
    from fractions import Fraction

    from rcod_core.progress import Progress

    x = torch.full((1, 1, 20, 20), 3.0)
    boxes = [(0, 12, 0, 12), (8, 20, 8, 20), (0, 12, 8, 20), (8, 20, 0, 12), (4, 16, 4, 16)]
    out = tiling.blend_tiles(lambda t, b: t, x, boxes, Fraction(1), 2, Progress(None, None, 5), 0.1)
    assert torch.allclose(out, x)


def test_fn_with_wrong_size_is_an_error():
    with pytest.raises(ValueError, match="fn must return"):
        tiled_apply(lambda t, b: t[..., :-1], torch.randn(1, 4, 40, 40), 16, 4)


# -- tiled VAE -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vae():
    from rcod_core.models import build_models

    return build_models("tiny", seed=0, with_clip=False).vae


def _latent(size, seed=0):
    """Smooth random latent with a left/right brightness step: tiles see different statistics."""
    g = torch.Generator().manual_seed(seed)
    z = F.interpolate(torch.randn(1, 4, size // 4, size // 4, generator=g), size=(size, size), mode="bicubic") * 0.5
    z[..., : size // 2] += 1.0
    z[..., size // 2 :] -= 1.0
    return z


def _seam_ratio(img, cols):
    """Mean |horizontal gradient| at the given columns (±4 px) over its mean everywhere."""
    gx = (img[..., 1:] - img[..., :-1]).abs().mean(dim=(0, 1, 2))
    return float(torch.stack([gx[c - 4 : c + 4].mean() for c in cols]).mean() / gx.mean())


@pytest.fixture(scope="module")
def decoded(vae):
    # 48² latent (384² px), tile 24, overlap 8: starts 0, 16, 24 → 9 tiles (a 64² latent behaves
    # alike; 48² keeps this file fast)
    z = _latent(48)
    with torch.no_grad():
        ref = vae.decode(z).sample
    return {
        "ref": ref,
        "estimate": tiled_decode(vae, z, tile_latent=24, overlap_latent=8, norm_stats="estimate", batch_tiles=4),
        "tile": tiled_decode(vae, z, tile_latent=24, overlap_latent=8, norm_stats="tile", batch_tiles=4),
    }


def test_tiled_decode_close_to_untiled(decoded):
    # The tiny VAE has random weights and is very sensitive to GroupNorm statistics (scaling every
    # variance by 1.01 moves its output by 12 % of its mean magnitude), so the estimate's ~10 %
    # variance error shows: measured max 1.16 / mean 0.055 (output |x| mean 0.24, max 4.0), against
    # max 3.9 / mean 0.17 with per-tile statistics. Bounds leave ~70 % headroom.
    ref, est, naive = decoded["ref"], decoded["estimate"], decoded["tile"]
    assert est.shape == ref.shape == (1, 3, 384, 384)
    err_est, err_naive = (est - ref).abs(), (naive - ref).abs()
    assert err_est.max() < 2.0 and err_est.mean() < 0.1
    assert err_est.mean() < 0.75 * err_naive.mean() and err_est.max() < err_naive.max()


def test_tiled_decode_no_seams(decoded):
    # tiles start at latent 0, 16, 24: the blend crosses over mid-overlap at 20 and 32 → ×8 px.
    # Normalised by the same ratio of the untiled output (the content has its own edges).
    cols = [160, 256]
    base = _seam_ratio(decoded["ref"], cols)
    est = _seam_ratio(decoded["estimate"], cols) / base
    assert 0.8 < est < 1.2


def test_exact_groupnorm_stats_nearly_untiled(vae):
    # Layer-by-layer accumulated statistics: what remains is zero padding at tile borders and the
    # float32 blend: measured max 0.19 / mean 0.0036 (per-tile statistics: max 2.2 / mean 0.12;
    # output |x| mean 0.25, max 2.6). Bounds leave ~3x headroom.
    z = _latent(24, seed=1)
    with torch.no_grad():
        ref = vae.decode(z).sample
    exact = tiled_decode(vae, z, tile_latent=16, overlap_latent=8, norm_stats="exact", batch_tiles=4)
    naive = tiled_decode(vae, z, tile_latent=16, overlap_latent=8, norm_stats="tile", batch_tiles=4)
    err, err_naive = (exact - ref).abs(), (naive - ref).abs()
    assert err.max() < 0.6 and err.mean() < 0.02
    assert err.mean() < 0.2 * err_naive.mean()


def test_tiled_encode(vae):
    g = torch.Generator().manual_seed(2)
    x = F.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(128, 128), mode="bicubic").clamp(0, 1) * 2 - 1
    x[..., :64] = x[..., :64] * 0.3 + 0.5
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    mean, std = tiled_encode(vae, x, tile_px=64, overlap_px=32, with_std=True)
    naive = tiled_encode(vae, x, tile_px=64, overlap_px=32, norm_stats="tile")
    assert mean.shape == std.shape == dist.mean.shape
    assert (mean - dist.mean).abs().mean() < (naive - dist.mean).abs().mean()
    whole = tiled_encode(vae, x, tile_px=128, overlap_px=32)  # fits one tile: the untiled call
    assert torch.equal(whole, dist.mean)
    with pytest.raises(ValueError, match="multiples"):
        tiled_encode(vae, x, tile_px=60, overlap_px=16)


def test_tiled_decode_is_float32_nhwc_and_encode_transform_streams(vae):
    # tiled: the float32 blend itself, (H, W, C)-contiguous, also from a bf16 decoder
    import copy

    z = _latent(32, seed=4)
    half = copy.deepcopy(vae).to(torch.bfloat16)
    out = tiled_decode(half, z.to(torch.bfloat16), tile_latent=16, overlap_latent=4)
    assert out.dtype == torch.float32 and out.permute(0, 2, 3, 1).is_contiguous()
    ref = tiled_decode(vae, z, tile_latent=16, overlap_latent=4)
    assert (out - ref).abs().mean() < 0.05  # bf16 vs fp32 decoder, same blend
    # encode: [0, 1] images with a per-tile transform == the transformed image encoded
    g = torch.Generator().manual_seed(5)
    img = F.interpolate(torch.rand(1, 3, 12, 12, generator=g), size=(128, 128), mode="bicubic").clamp(0, 1)
    seen = []

    def transform(t):
        seen.append(tuple(t.shape))
        return t * 2 - 1

    streamed = tiled_encode(vae, img, tile_px=64, overlap_px=32, transform=transform)
    whole = tiled_encode(vae, img * 2 - 1, tile_px=64, overlap_px=32)
    assert (streamed - whole).abs().max() < 1e-4
    assert max(s[-1] for s in seen) <= 64  # only tiles (and the downscaled statistics input) were transformed
    untiled = tiled_encode(vae, img, tile_px=128, overlap_px=32, transform=transform)
    assert torch.equal(untiled, tiled_encode(vae, img * 2 - 1, tile_px=128, overlap_px=32))


def test_vae_left_unmodified_after_cancel(vae):
    z = _latent(32, seed=3)
    with torch.no_grad():
        before = vae.decode(z).sample
    with pytest.raises(Cancelled):
        tiled_decode(vae, z, tile_latent=16, overlap_latent=4, cancel=iter([False, False, True]).__next__)
    assert all(not m._forward_hooks for m in vae.modules())
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, before)


# -- memory plans ----------------------------------------------------------------------------------
def _rank(tile):
    return math.inf if tile is None else tile


def test_plan_untiled_when_budget_large():
    assert choose_tile(512, 512, budget=64 * 2**30) == TilePlan()
    assert not choose_tile(512, 512, budget=64 * 2**30).tiled
    # SD 2.1 fp16 at 512²: decode ≈ 2.75 GB by the model → 4 GB is enough, 1 GB is not
    assert choose_tile(512, 512, budget=4 * 2**30).vae_decode_tile_latent is None
    assert choose_tile(512, 512, budget=2**30).vae_decode_tile_latent is not None


def test_plan_prices_the_vae_in_its_own_precision():
    """An fp16 UNet with the fp32 VAE of SD 2.1 (force_upcast): the VAE stages cost twice the bytes."""
    budget = 3 * 2**30
    same = choose_tile(1024, 1024, budget=budget, dtype_bytes=2)
    upcast = choose_tile(1024, 1024, budget=budget, dtype_bytes=2, vae_dtype_bytes=4)
    assert upcast.latent_tile == same.latent_tile  # the UNet is priced as before
    assert _rank(upcast.vae_decode_tile_latent) < _rank(same.vae_decode_tile_latent)
    assert _rank(upcast.vae_encode_tile_px) < _rank(same.vae_encode_tile_px)
    # the fp32 VAE at budget B is the fp16 VAE at B / 2
    half = choose_tile(1024, 1024, budget=budget // 2, dtype_bytes=2)
    assert (upcast.vae_decode_tile_latent, upcast.vae_encode_tile_px) == (half.vae_decode_tile_latent, half.vae_encode_tile_px)
    with pytest.raises(ValueError, match="vae_dtype_bytes"):
        choose_tile(512, 512, budget=2**30, vae_dtype_bytes=3)


def test_plan_shrinks_with_budget_and_covers():
    h, w = 2048, 1536
    previous = None
    for gib in (64, 32, 16, 8, 4, 2, 1, 0.5, 0.25):
        plan = choose_tile(h, w, budget=int(gib * 2**30))
        if previous is not None:
            for field in ("latent_tile", "vae_encode_tile_px", "vae_decode_tile_latent"):
                assert _rank(getattr(plan, field)) <= _rank(getattr(previous, field))
        previous = plan
        lh, lw = h // 8, w // 8
        for tile, overlap, size in ((plan.latent_tile, plan.latent_overlap, (lh, lw)),
                                    (plan.vae_decode_tile_latent, plan.vae_decode_overlap_latent, (lh, lw)),
                                    (plan.vae_encode_tile_px, plan.vae_encode_overlap_px, (h, w))):
            if tile is not None:
                assert tile % 8 == 0 and 0 < overlap < tile
                assert (_coverage(*size, tile_grid(*size, tile, overlap)) >= 1).all()
    assert previous.tiled


def test_plan_validation():
    with pytest.raises(ValueError, match="budget"):
        choose_tile(512, 512, budget=0)
    with pytest.raises(ValueError, match="dtype_bytes"):
        choose_tile(512, 512, budget=2**30, dtype_bytes=3)
    assert choose_tile(64, 64).latent_tile is None  # budget from free RAM on CPU
