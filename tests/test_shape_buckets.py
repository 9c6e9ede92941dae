"""Shape buckets: a compiled pipeline makes one graph per bucket instead of one per image size, the
output keeps its size, and the flag is checked before and after the model loads."""

from __future__ import annotations

import pytest
import torch

from rcod_core.testing.tiny import tiny_pipeline
from rcod_core.tools.cli import main

LR_SIZES = [(20, 24), (28, 30), (17, 31)]  # × 4: 80×96, 112×120, 68×124 — one 128 px bucket


def _compiled_frames(bucket: int) -> tuple[int, list[torch.Tensor]]:
    from torch._dynamo.testing import CompileCounter

    pipe = tiny_pipeline("rcod_o", seed=0).set_shape_bucket(bucket)
    torch._dynamo.reset()
    counter = CompileCounter()
    pipe.compile(backend=counter, dynamic=False)
    g = torch.Generator().manual_seed(0)
    try:
        outs = [pipe.run(torch.rand(1, 3, *hw, generator=g), realism=499, scale=4).images for hw in LR_SIZES]
    finally:
        torch._dynamo.reset()
    return counter.frame_count, outs


def test_one_compiled_graph_per_bucket():
    """CLIP, encoder, UNet and decoder compile once each for three sizes in one bucket; without the
    bucket the three padded sizes differ and the VAE and UNet compile for each (CLIP sees 224² always)."""
    bucketed, outs = _compiled_frames(128)
    unbucketed, plain = _compiled_frames(0)
    assert bucketed == 4
    assert unbucketed == 1 + 3 * len(LR_SIZES)
    for (h, w), a, b in zip(LR_SIZES, outs, plain):
        assert a.shape == b.shape == (1, 3, 4 * h, 4 * w)


def test_a_size_on_the_bucket_is_unchanged_and_bad_buckets_are_refused():
    pipe = tiny_pipeline("rcod_o", seed=0)
    lr = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # 128² out: on every bucket below
    ref = pipe.run(lr, realism=499, scale=4).images
    for bucket in (pipe.size_multiple, 64, 128):
        assert torch.equal(pipe.set_shape_bucket(bucket).run(lr, realism=499, scale=4).images, ref)
    assert pipe.set_shape_bucket(0).pad_multiple == pipe.size_multiple
    odd = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(2))
    assert pipe.set_shape_bucket(128).prepare(odd, scale=4).z_l.shape[-2:] == (128 // 8, 128 // 8)
    for bad in (48, -32, 1.5, True):
        with pytest.raises(ValueError, match="multiple of 32 px"):
            pipe.set_shape_bucket(bad)


def test_cli_shape_bucket_flag(tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "a.png"
    Image.new("RGB", (28, 20), (90, 120, 150)).save(src)
    base = ["upscale", str(src), "--tiny-smoke", "--quiet", "--device", "cpu"]
    assert main([*base, "-o", str(tmp_path / "o"), "--shape-bucket", "128"]) == 0
    assert Image.open(tmp_path / "o" / "a_rcod.png").size == (112, 80)
    capsys.readouterr()
    assert main([*base, "-o", str(tmp_path / "x"), "--shape-bucket", "40"]) == 2  # the model pads to 32 px
    assert "--shape-bucket: shape bucket must be 0 or a positive multiple of 32 px" in capsys.readouterr().err
    assert main([*base, "-o", str(tmp_path / "x"), "--shape-bucket", "64", "--processing", "release"]) == 2
    assert "--processing release pads as the release's scripts do" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "-o", str(tmp_path / "x"), "--shape-bucket", "12"])
    assert "--shape-bucket must be auto, 0 or a multiple" in capsys.readouterr().err
    assert not list((tmp_path / "x").glob("*"))  # nothing written
