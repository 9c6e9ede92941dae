import pytest
import torch

from rcod_core.grouping import (
    GroupingRule, latent_metric, metric_summary, resolve_realism, sample_regulariser_timestep, select_timestep,
)
from rcod_core.spec import ModelSpec


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
    rule = GroupingRule.paper(m_min=0.3, m_max=0.9, n=3, k=250)
    # group edges at m_min + i (m_max - m_min) / n = 0.5, 0.7
    m = torch.tensor([0.0, 0.3, 0.4999, 0.5, 0.6999, 0.7, 0.9, 1.0], dtype=torch.float64)
    assert select_timestep(m, rule).tolist() == [750, 750, 750, 500, 500, 250, 250, 250]
    assert rule.timesteps == (750, 500, 250) and rule.levels == [250, 500, 750]


def test_paper_rule_n4_clamps_to_999():
    rule = GroupingRule.paper(m_min=0.1, m_max=0.9, n=4)
    assert select_timestep([0.05, 0.29, 0.3, 0.5, 0.7, 0.95], rule).tolist() == [999, 999, 750, 500, 250, 250]


def test_paper_rule_is_eq5_with_the_data_bounds():
    # k = 200, n = 4 over [0.2, 0.8]: Eq. 5's groups have edges 0.35 / 0.5 / 0.65 → t 800 / 600 / 400 / 200,
    # written out by hand (not recomputed with the floor expression under test)
    rule = GroupingRule.paper(m_min=0.2, m_max=0.8, n=4, k=200)
    m = [0.1, 0.2, 0.3499, 0.35, 0.4999, 0.5, 0.6499, 0.65, 0.7999, 0.8, 0.95]
    assert select_timestep(m, rule).tolist() == [800, 800, 800, 600, 600, 400, 400, 200, 200, 200, 200]
    # other bounds, other groups: the bounds are data, not constants
    assert select_timestep([0.55], GroupingRule.paper(0.5, 0.8)).tolist() == [750]
    assert select_timestep([0.55], GroupingRule.paper(0.2, 0.6)).tolist() == [250]


def test_edges_hold_in_float32():
    m = torch.tensor([0.5, 0.7, 0.3], dtype=torch.float32)
    assert select_timestep(m, "official").tolist() == [499, 249, 749]
    assert select_timestep(m, GroupingRule.paper(0.3, 0.9)).tolist() == [500, 250, 750]
    assert select_timestep(torch.tensor([0.3, 0.5, 0.7], dtype=torch.float32), GroupingRule.official(4)).tolist() == [749, 499, 249]


def test_official_thresholds():
    r3 = GroupingRule.official(3)
    assert select_timestep([0.29, 0.3, 0.49, 0.5, 0.69, 0.7, 0.99], r3).tolist() == [749, 749, 749, 499, 499, 249, 249]
    r4 = GroupingRule.official(4)
    assert select_timestep([0.29, 0.3, 0.49, 0.5, 0.69, 0.7], r4).tolist() == [999, 749, 749, 499, 499, 249]
    assert select_timestep(torch.tensor([0.621]), "official").tolist() == [499]  # Fig. 6 example
    assert select_timestep(torch.tensor([0.621]), GroupingRule.paper(0.3, 0.9)).tolist() == [500]


def test_explicit_edges():
    rule = GroupingRule.from_edges([0.6, 0.7, 0.8])
    assert rule.n == 4 and rule.timesteps == (999, 750, 500, 250)
    assert select_timestep([0.2, 0.6, 0.69, 0.7, 0.9], rule).tolist() == [999, 750, 750, 500, 250]
    custom = GroupingRule.from_edges([0.65], timesteps=[700, 300])
    assert select_timestep([0.64, 0.65], custom).tolist() == [700, 300]


def test_rule_round_trips_through_the_spec_json():
    for rule in (GroupingRule.official(4), GroupingRule.paper(0.41, 0.87, n=3, k=240),
                 GroupingRule.from_edges([0.6, 0.7], timesteps=[800, 500, 200])):
        spec = ModelSpec.for_kind("rcod_s", grouping=rule)
        back = ModelSpec.from_json(spec.to_json())
        assert back.grouping == rule and back == spec


def test_version1_specs_keep_their_meaning():
    legacy = ModelSpec.for_kind("rcod_o").to_dict()
    del legacy["grouping"]
    assert ModelSpec.from_dict({**legacy, "grouping_rule": "official", "grouping_n": 4}).grouping == GroupingRule.official(4)
    paper = ModelSpec.from_dict({**legacy, "grouping_rule": "paper", "grouping_n": 3}).grouping
    assert (paper.kind, paper.m_min, paper.m_max) == ("paper", 0.3, 0.9)
    assert ModelSpec.for_kind("rcod_o").grouping == GroupingRule.official(3)  # files without a rule


def test_bad_rules():
    with pytest.raises(ValueError, match="n must be in"):
        GroupingRule.paper(0.3, 0.9, n=5)
    with pytest.raises(ValueError, match="m_max > m_min"):
        GroupingRule.paper(m_min=0.8, m_max=0.2)
    with pytest.raises(ValueError, match="scan-metric"):
        GroupingRule(kind="paper")
    with pytest.raises(ValueError, match="n = 3 and n = 4"):
        GroupingRule.official(2)
    with pytest.raises(ValueError, match="strictly ascending"):
        GroupingRule.from_edges([0.7, 0.6])
    with pytest.raises(ValueError, match="one more timestep"):
        GroupingRule.from_edges([0.6], timesteps=[500])
    with pytest.raises(ValueError, match="unknown grouping rule field"):
        GroupingRule.from_dict({"kind": "official", "thresholds": [0.5]})
    with pytest.raises(ValueError, match="finite"):
        select_timestep([float("nan")])
    with pytest.raises(ValueError, match="grouping rule"):
        select_timestep([0.5], "median")


def test_metric_summary_has_eq5_bounds():
    m = torch.tensor([0.42, 0.9, 0.61, 0.55, 0.73])
    s = metric_summary(m, groups=3)
    assert s["samples"] == 5 and s["m_min"] == pytest.approx(0.42) and s["m_max"] == pytest.approx(0.9)
    assert len(s["quantile_edges"]) == 2 and s["quantile_edges"] == sorted(s["quantile_edges"])
    with pytest.raises(ValueError, match="finite"):
        metric_summary(torch.tensor([float("inf")]))


def test_presets_and_integers():
    assert [resolve_realism(p) for p in ("fidelity", "Neutral", "REALISM")] == [250, 500, 750]
    assert [resolve_realism(p, "official") for p in ("fidelity", "neutral", "realism")] == [249, 499, 749]
    assert resolve_realism(1) == 1 and resolve_realism("999") == 999
    for bad in ("ultra", 0, 1000, "-3"):
        with pytest.raises(ValueError, match="realism"):
            resolve_realism(bad)


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_das_support_is_exactly_eq7(mode):
    # every value of Eq. 7's range is drawn and nothing outside it: both ends inclusive in the paper's
    # form, the upper end exclusive in the release's (20 000 draws per t, seeded)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([249, 499, 749, 999] * 20000)
    tr = sample_regulariser_timestep(t, mode=mode, generator=g)
    for tv in (249, 499, 749, 999):
        if mode == "paper":
            lo, hi = max(20, tv - 250), min(980, tv + 250)
        else:
            lo, hi = (20 if tv < 749 else 200), 979
        assert set(tr[t == tv].tolist()) == set(range(lo, hi + 1)), tv


def test_das_is_seeded():
    t = torch.tensor([500, 700])
    a = sample_regulariser_timestep(t, generator=torch.Generator().manual_seed(3))
    b = sample_regulariser_timestep(t, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
