"""A/B assignment (serving/experiments.py): sticky, near its shares, independent across experiments."""

from __future__ import annotations

import numpy as np
import pytest

from serving.experiments import Arm, Experiment

USERS = np.arange(1, 100_001)


def experiment(name="exp", shares=(0.5, 0.3, 0.2), **kw) -> Experiment:
    arms = tuple(Arm(f"a{i}", "student", s) for i, s in enumerate(shares))
    return Experiment(name, arms, **kw)


def test_assignment_is_sticky_and_near_the_shares_over_100k_users():
    exp = experiment()
    arms = [exp.assign(u).name for u in USERS]
    assert arms == [experiment().assign(u).name for u in USERS]  # deterministic: another replica agrees
    for arm, share in zip(("a0", "a1", "a2"), (0.5, 0.3, 0.2), strict=True):
        assert abs(arms.count(arm) / len(USERS) - share) < 0.01, arm  # within 1 percentage point


def test_experiments_with_different_salts_split_independently():
    one = np.array([experiment("one", (0.5, 0.5)).assign(u).name == "a0" for u in USERS])
    two = np.array([experiment("two", (0.5, 0.5)).assign(u).name == "a0" for u in USERS])
    both = (one & two).mean()
    assert abs(both - one.mean() * two.mean()) < 0.01  # P(a0 and a0) = P(a0) P(a0): no correlation
    same_salt = np.array([experiment("three", (0.5, 0.5), salt="one").assign(u).name == "a0" for u in USERS])
    assert (same_salt == one).all()  # the salt, not the name, decides


def test_a_forced_user_gets_the_forced_arm_and_zero_shares_get_nobody():
    exp = experiment(shares=(1.0, 0.0, 0.0), force={7: "a2"})
    assert exp.assign(7).name == "a2"
    assert {exp.assign(u).name for u in USERS[:5000] if u != 7} == {"a0"}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"name": "e", "arms": [{"name": "a", "producer": "student", "share": 0.5}]}, "sum to 1"),
        ({"name": "e", "arms": [{"name": "a", "producer": "bert", "share": 1}]}, "producer"),
        ({"name": "e", "arms": [{"name": "a", "producer": "similar", "share": 1, "run": "x"}]}, "run"),
        ({"name": "e", "arms": [{"name": "a", "producer": "student", "share": -1}]}, "share"),
        ({"name": "e", "arms": [{"name": "a", "producer": "student", "share": 0.5}] * 2}, "unique"),
        (
            {"name": "e", "arms": [{"name": "a", "producer": "student", "share": 1}], "force": {1: "b"}},
            "force",
        ),
        (
            {"name": "e", "arms": [{"name": "a", "producer": "student", "share": 1}], "shares": 1},
            "unknown keys",
        ),
        ({"name": "e", "arms": []}, "at least one arm"),
    ],
)
def test_bad_experiments_are_refused_naming_the_field(config, message):
    with pytest.raises(ValueError, match=message):
        Experiment.from_dict(config)


def test_mixer_arms_split_the_default_blend_and_do_not_mix_with_producer_arms():
    exp = Experiment.from_dict(
        {
            "name": "blend",
            "arms": [
                {"name": "tuned", "share": 0.5, "weights": {"student": 2, "sasrec": 1}},
                {"name": "popular", "share": 0.5, "weights": {"popular": 1}},
            ],
        }
    )
    assert exp.kind == "mix" and exp.assign(1).weights in ({"student": 2, "sasrec": 1}, {"popular": 1})
    with pytest.raises(ValueError, match="no single producer"):
        _ = exp.arms[0].key
    both = {"name": "e", "arms": [{"name": "a", "producer": "student", "share": 0.5},
                                  {"name": "b", "weights": {"popular": 1}, "share": 0.5}]}  # fmt: skip
    with pytest.raises(ValueError, match="not both"):
        Experiment.from_dict(both)
    for weights in ({"bert": 1}, {"student": -1}, {"student": 0}, {"student": float("nan")}):
        with pytest.raises(ValueError, match="weights"):
            Experiment.from_dict({"name": "e", "arms": [{"name": "a", "share": 1, "weights": weights}]})
    with pytest.raises(ValueError, match="no producer or run"):
        Experiment.from_dict(
            {
                "name": "e",
                "arms": [{"name": "a", "share": 1, "producer": "student", "weights": {"popular": 1}}],
            }
        )
