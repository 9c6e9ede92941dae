"""The demo model's stages: training photos from packages, the small VAE and prior, RCOD on them."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from test_trainer import _cli, _images


def _jpeg(size, seed) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _deb(path: Path, files: dict[str, bytes]) -> Path:
    """A Debian package as dpkg writes it: an ar archive of debian-binary, control and data tars."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b""), ("data.tar.xz", data.getvalue())]
    out = bytearray(b"!<arch>\n")
    for name, blob in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode()
        out += blob + (b"\n" if len(blob) % 2 else b"")
    path.write_bytes(bytes(out))
    return path


def test_sample_data_reads_debian_wallpapers_and_records_each_source(tmp_path):
    from trainer.sample_data import DEB_VAL_EVERY, write_sample_data

    meta = json.dumps({"KPlugin": {"License": "CC-BY-SA-4.0", "Authors": [{"Name": "A. Painter"}]}}).encode()
    files = {f"usr/share/backgrounds/mate/nature/Photo{i}.jpg": _jpeg((80, 60), i) for i in range(3)}
    files.update({
        "usr/share/wallpapers/Hill/contents/images/800x600.jpg": _jpeg((80, 60), 10),
        "usr/share/wallpapers/Hill/contents/images/1600x1200.jpg": _jpeg((1000, 750), 11),
        "usr/share/wallpapers/Hill/metadata.json": meta,
        "usr/share/wallpapers/Lake/contents/images/640x480.jpg": _jpeg((64, 48), 12),
        "usr/share/backgrounds/mate/desktop/Logo.png": _jpeg((20, 20), 13),  # not a photo set: skipped
    })
    deb = _deb(tmp_path / "walls_1.0_all.deb", files)
    written = write_sample_data(tmp_path / "out", debs=[str(deb)], max_side=640)
    manifest = json.loads((tmp_path / "out" / "SOURCES.json").read_text())
    debian = sorted((m for m in manifest if m["package"] == "walls"), key=lambda m: m["file"].split("/")[1])
    assert [Path(m["file"]).stem for m in debian] == ["mate_Photo0", "mate_Photo1", "mate_Photo2", "plasma_Hill", "plasma_Lake"]
    hill = next(m for m in debian if "Hill" in m["file"])
    assert hill["path"].endswith("1600x1200.jpg") and hill["licence"] == "CC-BY-SA-4.0 (A. Painter)"
    assert hill["size"] == [640, 480]                       # reduced to --max-side, aspect kept
    held = [Path(m["file"]).stem for m in debian if m["file"].startswith("val/")]
    assert held == ["plasma_Lake"] and DEB_VAL_EVERY == 5   # the 5th by name is held out
    assert all((tmp_path / "out" / m["file"]).is_file() for m in manifest)
    assert {p.stem for p in written["val"]} >= {"plasma_Lake", "skimage_coffee"}
    assert not set(p.stem for p in written["val"]) & set(p.stem for p in written["train"])


def test_a_file_that_is_not_a_package_is_one_clear_line(tmp_path):
    from trainer.sample_data import read_deb

    bad = tmp_path / "x.deb"
    bad.write_bytes(b"PK\x03\x04 not an ar archive")
    with pytest.raises(SystemExit, match="not a Debian package"):
        read_deb(bad)
    with pytest.raises(SystemExit, match="cannot read the package"):
        read_deb(tmp_path / "missing.deb")


def test_vae_init_trains_from_scratch():
    """He-normal convolutions and a small posterior log-variance (the two things the default init lacks)."""
    from trainer.pretrain import COMMON, STAGE_DEFAULTS, build_vae

    cfg = {**COMMON, **STAGE_DEFAULTS["vae"]}
    cfg["vae"] = {**cfg["vae"], "block_out_channels": [16, 16, 32], "norm_num_groups": 8, "zero_residual": True}
    torch.manual_seed(0)
    vae = build_vae(cfg)
    w = vae.encoder.down_blocks[1].resnets[0].conv1.weight
    assert float(w.detach().std()) == pytest.approx((2 / w[0].numel()) ** 0.5, rel=0.05)
    assert float(vae.encoder.down_blocks[1].resnets[0].conv2.weight.abs().max()) == 0.0
    post = vae.encode(torch.rand(1, 3, 32, 32) * 2 - 1).latent_dist
    assert float(post.std.max()) < 0.1                      # exp(-6 / 2) ≈ 0.05 rather than 1


def _stage_configs(tmp_path: Path) -> tuple[Path, Path]:
    train = _images(tmp_path / "data" / "train", n=3, size=(64, 48))
    val = _images(tmp_path / "data" / "val", n=2, size=(64, 48), seed=5)
    common = {"seed": 0, "data": {"train": str(train), "val": str(val), "crop": 32, "val_crop": 32},
              "train": {"batch_size": 2, "max_steps": 3, "threads": 1, "bf16": False},
              "optim": {"warmup_steps": 1}, "log": {"every": 1}, "validation": {"every": 2}}
    vae_cfg = {**common, "stage": "vae", "output_dir": str(tmp_path / "vae"),
               "vae": {"block_out_channels": [16, 16, 32], "norm_num_groups": 8}}
    prior_cfg = {**common, "stage": "prior", "output_dir": str(tmp_path / "prior"), "vae": str(tmp_path / "vae"),
                 "unet": {"block_out_channels": [16, 32, 32], "norm_num_groups": 8, "cross_attention_dim": 16,
                          "attention_head_dim": 4},
                 "bank_size": 8, "optim": {"lr": 1e-3, "warmup_steps": 1}}
    paths = tmp_path / "vae.yaml", tmp_path / "prior.yaml"
    paths[0].write_text(yaml.safe_dump(vae_cfg))
    paths[1].write_text(yaml.safe_dump(prior_cfg))
    return paths


def test_each_stage_runs_and_chains_into_rcod_training(tmp_path, capsys):
    """A few steps of every stage, as the documented commands run them: VAE → prior → scan-metric →
    RCOD_O with the paper rule, null-token VSD and Eq. 4 → the exported file upscales."""
    vae_yaml, prior_yaml = _stage_configs(tmp_path)
    assert _cli(["pretrain", "--config", vae_yaml]) == 0
    summary = json.loads((tmp_path / "vae" / "summary.json").read_text())
    assert [s for s, _ in summary["curve"]] == [2, 3]
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert vae.config.block_out_channels == (16, 16, 32) or list(vae.config.block_out_channels) == [16, 16, 32]
    assert summary["scaling_factor"] == pytest.approx(vae.config.scaling_factor) and summary["scaling_factor"] > 0

    assert _cli(["pretrain", "--config", prior_yaml]) == 0
    base = tmp_path / "prior" / "base"
    per_t = json.loads((tmp_path / "prior" / "prior_loss_per_t.json").read_text())
    assert sorted(int(t) for t in per_t["val_loss_per_t"]) == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
    assert Image.open(tmp_path / "prior" / "prior_grid.png").size == (32 * 6, 4 * 2 * 32)  # 4 crops: clean + 5 t; noisy over x0
    from safetensors import safe_open

    with safe_open(str(base / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16   # save_dtype float16
    from rcod_core.loader import detect_folder_family, load_base

    assert detect_folder_family(base) == "sd21_base"
    for part in ("unet", "vae"):  # no path of the machine that trained it
        assert "_name_or_path" not in json.loads((base / part / "config.json").read_text())
    loaded = load_base(base, "sd21_base", with_clip=True, clip=base / "clip_vision")
    assert next(loaded.unet.parameters()).dtype == torch.float32 and loaded.latent_factor == 4

    rcod = {
        "model": "rcod_o", "seed": 0, "output_dir": str(tmp_path / "rcod"),
        "base": {"family": "sd21_base", "path": str(base), "clip": str(base / "clip_vision")},
        "data": {"train": [{"type": "hr", "path": str(tmp_path / "data" / "train")}], "crop": 32,
                 "val": {"type": "hr", "path": str(tmp_path / "data" / "val")}, "val_count": 2},
        "grouping": {"rule": "paper", "n": 3, "bounds": str(tmp_path / "scan.json")},
        "spec": {"x0_mode": "paper", "fixed_alpha_bar": None},
        "loss": {"l2": 1.0, "lpips": 0.0, "vsd": 1.0, "vsd_lora": 1.0, "cfg": 1.0},
        "lpips": {"mode": "off"}, "regulariser": {"condition": "null"},
        "optim": {"lr": 1e-3, "lr_reg": 1e-3}, "train": {"batch_size": 2, "max_steps": 2, "threads": 1},
        "log": {"every": 1, "tensorboard": "off"}, "checkpoint": {"every": 2}, "validation": {"every": 2},
    }
    rcod_yaml = tmp_path / "rcod.yaml"
    rcod_yaml.write_text(yaml.safe_dump(rcod))
    (tmp_path / "scan.json").write_text(json.dumps({"m_min": 0.0, "m_max": 1.0}))  # overwritten by the scan
    assert _cli(["scan-metric", "--config", rcod_yaml, "--samples", "4", "--out", tmp_path / "scan.json"]) == 0
    scan = json.loads((tmp_path / "scan.json").read_text())
    assert -1.0 <= scan["m_min"] < scan["m_max"] <= 1.0
    assert _cli(["train", "--config", rcod_yaml, "--quiet"]) == 0
    capsys.readouterr()
    ckpt_file = tmp_path / "rcod" / "checkpoints" / "step_0000002" / "model.safetensors"
    from rcod_core.loader import load_pipeline

    pipe = load_pipeline(ckpt_file)
    assert pipe.spec.x0_mode == "paper" and pipe.spec.grouping.kind == "paper"
    assert pipe.spec.grouping.m_min == pytest.approx(scan["m_min"])
    lr = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(0))
    out = pipe.run(lr, realism="realism").images
    assert out.shape == (1, 3, 48, 64) and torch.isfinite(out).all()

    # packaged: a folder that loads on its own, its base and CLIP inside it, same output
    assert _cli(["package", "--checkpoint", ckpt_file, "--out", tmp_path / "pkg"]) == 0
    from rcod_core.checkpoints import read_metadata

    assert read_metadata(tmp_path / "pkg" / "model.safetensors")["base"] == "base"
    assert read_metadata(tmp_path / "pkg" / "model.safetensors")["clip"] == "base/clip_vision"
    packaged = load_pipeline(tmp_path / "pkg" / "model.safetensors", metadata_roots=[tmp_path / "pkg"])
    assert torch.equal(packaged.run(lr, realism="realism").images, out)
    assert _cli(["package", "--checkpoint", ckpt_file, "--out", tmp_path / "pkg"]) == 2   # not empty: refused

    # the evaluation set: fixed crops, degraded with seeded Real-ESRGAN draws, the same twice
    for run in ("a", "b"):
        assert _cli(["degrade", "--hr", tmp_path / "data" / "val", "--out", tmp_path / run, "--severity", "mild",
                     "--crop", "32", "--per-image", "1"]) == 0
    lr_a = np.asarray(Image.open(tmp_path / "a" / "lr" / "000.png"))
    assert lr_a.shape == (8, 8, 3) and np.array_equal(lr_a, np.asarray(Image.open(tmp_path / "b" / "lr" / "000.png")))


def test_null_condition_gives_the_regulariser_one_zero_token(tmp_path):
    """``regulariser.condition: null``: both scores of the frozen prior and the LoRA copy see one
    all-zero token, whatever the generator's VPIM tokens are."""
    from test_trainer import _config, _write
    from trainer import config as config_mod
    from trainer.engine import Trainer

    cfg = config_mod.load(_write(tmp_path, _config(tmp_path, regulariser={"condition": "null"},
                                                    lpips={"mode": "off"}, loss={"lpips": 0.0})))
    trainer = Trainer(cfg, log_stdout=False)
    trainer.build()
    seen = []
    for unet in (trainer.regulariser.unet_fix, trainer.regulariser.unet_update):
        unet.register_forward_pre_hook(lambda m, a, k: seen.append(k["encoder_hidden_states"].clone()), with_kwargs=True)
    batch = {"hr": torch.stack([trainer.dataset[k]["hr"] for k in (0, 1)]), "index": torch.tensor([0, 1])}
    trainer._step_rcod_o(*trainer._prepare_batch(batch), {})
    assert len(seen) >= 3
    for tokens in seen:
        assert tokens.shape[1] == 1 and float(tokens.abs().max()) == 0.0


def test_cpu_bf16_is_chosen_from_the_cpu_flags(monkeypatch):
    from rcod_core import devices

    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert devices.cpu_has_native_bf16()
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert not devices.cpu_has_native_bf16()


def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch):
    from rcod_core import devices

    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert devices.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2"}))
    assert devices.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert devices.resolve_dtype("fp32", torch.device("cpu")) == torch.float32  # an explicit choice stands
    assert devices.prefer_channels_last(torch.device("cuda"), torch.float16)
    assert not devices.prefer_channels_last(torch.device("mps"), torch.float32)
    assert devices.prefer_channels_last(torch.device("cpu"), torch.bfloat16)  # measured faster (CPU_CHANNELS_LAST)
    assert not devices.prefer_channels_last(torch.device("cpu"), torch.float16)  # not measured: default layout


def test_fp16_pipelines_keep_an_upcast_vae_in_bf16_where_the_device_has_it(monkeypatch):
    """SD 2.1's VAE (force_upcast) overflows in fp16: it runs in bf16 where the device computes bf16
    (same range as fp32, half the bytes), in fp32 elsewhere; other precisions pass through."""
    from types import SimpleNamespace

    from rcod_core import devices
    from rcod_core import pipeline

    upcast = SimpleNamespace(config=SimpleNamespace(force_upcast=True))
    plain = SimpleNamespace(config=SimpleNamespace(force_upcast=False))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert devices.computes_bf16(torch.device("cuda"))
    assert pipeline.default_vae_dtype(upcast, torch.float16, "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # e.g. a T4
    assert pipeline.default_vae_dtype(upcast, torch.float16, "cuda") == torch.float32
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2"}))
    assert pipeline.default_vae_dtype(upcast, torch.float16, "cpu") == torch.float32
    assert pipeline.default_vae_dtype(upcast, torch.float16) == torch.float32  # device unknown: the safe choice
    assert pipeline.default_vae_dtype(plain, torch.float16, "cuda") == torch.float16
    assert pipeline.default_vae_dtype(upcast, torch.bfloat16, "cuda") == torch.bfloat16
