"""Intervals for success rates: Wilson for one evaluation, the bootstrap over seeds and
episodes for the experiment."""

import numpy as np
import pytest

from policies.stats import hierarchical_bootstrap, wilson_interval


def test_the_bootstrap_of_one_group_matches_the_normal_interval_of_a_mean():
    values = (np.arange(400) % 10 < 3).astype(float)  # 30% success over 400 episodes
    got = hierarchical_bootstrap([values], resamples=4000, seed=1)
    half = 1.96 * values.std() / np.sqrt(len(values))
    assert got["mean"] == pytest.approx(0.3)
    assert got["low"] == pytest.approx(0.3 - half, abs=0.01) and got["high"] == pytest.approx(0.3 + half, abs=0.01)
    low, high = wilson_interval(120, 400)
    assert got["low"] == pytest.approx(low, abs=0.015) and got["high"] == pytest.approx(high, abs=0.015)


def test_seeds_that_disagree_widen_the_interval_beyond_the_pooled_episodes():
    apart = [np.ones(100), np.zeros(100), np.ones(100)]  # each seed certain, the seeds far apart
    mixed = [np.r_[np.ones(67), np.zeros(33)]] * 3  # the same pooled rate, seeds alike
    wide, narrow = hierarchical_bootstrap(apart, 2000), hierarchical_bootstrap(mixed, 2000)
    assert wide["mean"] == pytest.approx(2 / 3) and narrow["mean"] == pytest.approx(0.67)
    assert wide["high"] - wide["low"] > 3 * (narrow["high"] - narrow["low"])


def test_constant_values_give_a_point_interval_and_bad_input_is_refused():
    assert hierarchical_bootstrap([[1.0, 1.0], [1.0]], 100) == {"mean": 1.0, "low": 1.0, "high": 1.0}
    with pytest.raises(ValueError, match="at least one group"):
        hierarchical_bootstrap([[1.0], []])
    with pytest.raises(ValueError, match="level must be in"):
        hierarchical_bootstrap([[1.0]], level=1.5)
