import pytest
import torch

from rcod_core.grouping import (
    PaperRule, ThresholdRule, latent_metric, make_rule, resolve_realism, sample_regulariser_timestep,
    select_timestep,
)


def test_metric_identity_symmetry_and_batch():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, 8, 8, generator=g)
    b = torch.randn(4, 4, 8, 8, generator=g)
    assert torch.allclose(latent_metric(a, a), torch.ones(4), atol=1e-6)
    assert torch.allclose(latent_metric(a, b), latent_metric(b, a))
    assert torch.allclose(latent_metric(a, -a), -torch.ones(4), atol=1e-6)
    per_sample = torch.stack([latent_metric(a[i : i + 1], b[i : i + 1])[0] for i in range(4)])
    assert torch.equal(latent_metric(a, b), per_sample)
    ref = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)
    assert torch.allclose(latent_metric(a, b), ref, atol=1e-6)
    # scale invariant
    assert torch.allclose(latent_metric(3 * a, b), latent_metric(a, b), atol=1e-6)


def test_metric_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        latent_metric(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 3))


def test_paper_rule_boundaries():
    rule = PaperRule(k=250, n=3, m_min=0.3, m_max=0.9)
    # group edges at m_min + i (m_max - m_min) / n = 0.5, 0.7
    m = torch.tensor([0.0, 0.3, 0.4999, 0.5, 0.6999, 0.7, 0.9, 1.0], dtype=torch.float64)
    assert select_timestep(m, rule).tolist() == [750, 750, 750, 500, 500, 250, 250, 250]


def test_paper_rule_n4_clamps_to_999():
    rule = make_rule("paper", n=4)
    assert rule.m_min == pytest.approx(0.1)
    assert select_timestep([0.05, 0.29, 0.3, 0.5, 0.7, 0.95], rule).tolist() == [999, 999, 750, 500, 250, 250]


def test_paper_rule_equals_eq5_inside_range():
    rule = PaperRule(k=200, n=4, m_min=0.2, m_max=0.8)
    for m in torch.linspace(0.2, 0.7999, 50).tolist():
        expected = 200 * (4 - int((4 * (m - 0.2) / 0.6) // 1))
        assert select_timestep(m, rule).item() == min(expected, 999)


def test_edges_hold_in_float32():
    m = torch.tensor([0.5, 0.7, 0.3], dtype=torch.float32)
    assert select_timestep(m, "official").tolist() == [499, 249, 749]
    assert select_timestep(m, "paper").tolist() == [500, 250, 750]
    assert select_timestep(torch.tensor([0.3, 0.5, 0.7], dtype=torch.float32), ThresholdRule.official(4)).tolist() == [749, 499, 249]


def test_official_thresholds():
    r3 = ThresholdRule.official(3)
    assert select_timestep([0.29, 0.3, 0.49, 0.5, 0.69, 0.7, 0.99], r3).tolist() == [749, 749, 749, 499, 499, 249, 249]
    r4 = ThresholdRule.official(4)
    assert select_timestep([0.29, 0.3, 0.49, 0.5, 0.69, 0.7], r4).tolist() == [999, 749, 749, 499, 499, 249]
    assert select_timestep(torch.tensor([0.621]), "official").tolist() == [499]  # Fig. 6 example
    assert select_timestep(torch.tensor([0.621]), "paper").tolist() == [500]


def test_bad_rules():
    with pytest.raises(ValueError, match="n must be in"):
        PaperRule(n=5)
    with pytest.raises(ValueError, match="m_max > m_min"):
        PaperRule(m_min=0.8, m_max=0.2)
    with pytest.raises(ValueError, match="n = 3 and n = 4"):
        ThresholdRule.official(2)
    with pytest.raises(ValueError, match="finite"):
        select_timestep([float("nan")])
    with pytest.raises(ValueError, match="grouping rule"):
        select_timestep([0.5], "median")


def test_presets_and_integers():
    assert [resolve_realism(p) for p in ("fidelity", "Neutral", "REALISM")] == [250, 500, 750]
    assert [resolve_realism(p, "official") for p in ("fidelity", "neutral", "realism")] == [249, 499, 749]
    assert resolve_realism(1) == 1 and resolve_realism("999") == 999
    for bad in ("ultra", 0, 1000, "-3"):
        with pytest.raises(ValueError, match="realism"):
            resolve_realism(bad)


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_das_ranges(mode):
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([249, 499, 749, 999] * 5000)
    tr = sample_regulariser_timestep(t, mode=mode, generator=g)
    for tv in (249, 499, 749, 999):
        s = tr[t == tv]
        if mode == "paper":
            lo, hi = max(20, tv - 250), min(980, tv + 250)
            assert s.min() >= lo and s.max() <= hi
            assert s.min() <= lo + 5 and s.max() >= hi - 5  # both ends reachable (inclusive)
        else:
            lo = 20 if tv < 749 else 200
            assert s.min() >= lo and s.max() <= 979
            assert s.min() <= lo + 5 and s.max() >= 975


def test_das_is_seeded():
    t = torch.tensor([500, 700])
    a = sample_regulariser_timestep(t, generator=torch.Generator().manual_seed(3))
    b = sample_regulariser_timestep(t, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
