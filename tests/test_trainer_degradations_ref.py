"""Our Real-ESRGAN kernels against basicsr's reference implementation (optional extra ``train-ref``).

Skipped unless the ``basicsr`` distribution is installed
(``pip install --no-build-isolation --no-deps basicsr-fixed`` plus opencv-python-headless and scipy).
basicsr's package ``__init__`` imports torchvision, which does not import beside torch 2.13 here, so the
test loads ``basicsr/data/degradations.py`` by path with a stand-in for the one torchvision function it
imports (``rgb_to_grayscale``, unused by the kernel functions).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import torch

spec = importlib.util.find_spec("basicsr")
pytestmark = pytest.mark.skipif(spec is None, reason="basicsr (extra 'train-ref') is not installed")


@pytest.fixture(scope="module")
def ref():
    pytest.importorskip("cv2")
    pytest.importorskip("scipy")
    from pathlib import Path

    path = Path(spec.submodule_search_locations[0]) / "data" / "degradations.py"
    stub_needed = importlib.util.find_spec("torchvision") is None
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")}
    if stub_needed:
        tv = types.ModuleType("torchvision")
        tr = types.ModuleType("torchvision.transforms")
        fn = types.ModuleType("torchvision.transforms.functional")
        fn.rgb_to_grayscale = lambda img, num_output_channels=1: img
        tv.transforms, tr.functional = tr, fn
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tr, "torchvision.transforms.functional": fn})
    try:
        mod_spec = importlib.util.spec_from_file_location("basicsr_degradations_ref", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    except Exception as exc:  # pragma: no cover - environment specific
        pytest.skip(f"cannot load basicsr's degradations.py: {exc}")
    finally:
        if stub_needed:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
    return module


def test_kernel_shapes_match_reference(ref):
    from trainer.realesrgan import bivariate_kernel, sinc_kernel

    for size, cutoff in ((7, math.pi / 2), (13, 1.1), (21, math.pi / 4)):
        ours = sinc_kernel(size, cutoff).numpy()
        theirs = ref.circular_lowpass_kernel(cutoff, size, pad_to=0)
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
    for size, sx, sy, theta, beta in ((21, 2.0, 0.7, 0.4, 1.0), (15, 1.2, 2.5, -1.0, 0.6), (9, 0.5, 0.5, 0.0, 3.0)):
        np.testing.assert_allclose(bivariate_kernel(size, sx, sy, theta, "gaussian").numpy(),
                                   ref.bivariate_Gaussian(size, sx, sy, theta, isotropic=False), atol=1e-7)
        np.testing.assert_allclose(bivariate_kernel(size, sx, sy, theta, "generalized", beta).numpy(),
                                   ref.bivariate_generalized_Gaussian(size, sx, sy, theta, beta, isotropic=False), atol=1e-7)
        np.testing.assert_allclose(bivariate_kernel(size, sx, sy, theta, "plateau", beta).numpy(),
                                   ref.bivariate_plateau(size, sx, sy, theta, beta, isotropic=False), atol=1e-7)


def _spread(k: np.ndarray) -> float:
    """Second moment of a kernel: mean squared distance from the centre (blur strength)."""
    c = k.shape[0] // 2
    yy, xx = np.mgrid[-c:c + 1, -c:c + 1]
    return float((k * (xx ** 2 + yy ** 2)).sum() / k.sum())


def test_kernel_statistics_match_reference(ref):
    """Same settings (first degradation of params_realesrgan.yml, no sinc): the distribution of the
    kernels' spread agrees with basicsr's random_mixed_kernels over 400 draws per kernel size."""
    from trainer.realesrgan import DegradationConfig, random_kernel

    c = DegradationConfig()
    g = torch.Generator().manual_seed(0)
    import random

    np.random.seed(0)
    random.seed(0)
    for size in (7, 21):
        ours = [_spread(random_kernel(g, c.kernel_list, c.kernel_prob, c.blur_sigma, c.betag_range, c.betap_range,
                                      0.0, (size,), pad_to=size)[0].numpy()) for _ in range(400)]
        theirs = [_spread(ref.random_mixed_kernels(list(c.kernel_list), list(c.kernel_prob), size, list(c.blur_sigma),
                                                   list(c.blur_sigma), [-math.pi, math.pi], list(c.betag_range),
                                                   list(c.betap_range), noise_range=None)) for _ in range(400)]
        m_o, m_t = np.mean(ours), np.mean(theirs)
        assert abs(m_o - m_t) / m_t < 0.08, (size, m_o, m_t)
        q_o, q_t = np.quantile(ours, [0.25, 0.5, 0.75]), np.quantile(theirs, [0.25, 0.5, 0.75])
        assert np.all(np.abs(q_o - q_t) / q_t < 0.15), (size, q_o, q_t)
