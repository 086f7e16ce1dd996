"""Bootstrap intervals and paired comparisons against scipy.stats (bootstrap, wilcoxon)."""

import numpy as np
import pytest
from scipy import stats as sps

from advalign_jax.evaluation import stats

RESAMPLES = 20_000
# Our resamples and scipy's are independent draws: each interval end is a Monte Carlo estimate of a
# quantile with a standard deviation of about 0.02 standard errors of the mean at 20,000 resamples,
# so 0.15 standard errors is more than 5 standard deviations of the difference, for any seed.
TOLERANCE_SE = 0.15


def _datasets():
    rng = np.random.default_rng(123)
    return {"normal": rng.normal(0.3, 1.0, 60), "skewed": rng.exponential(1.0, 40),
            "binary": (rng.random(128) < 0.8).astype(float), "spearman-like": np.tanh(rng.normal(0.4, 0.3, 128))}


@pytest.mark.parametrize("name", list(_datasets()))
@pytest.mark.parametrize("seed", [0, 1])
def test_interval_is_scipys_percentile_bootstrap(name, seed):
    x = _datasets()[name]
    low, high = stats.bootstrap_interval(x, RESAMPLES, 0.95, seed)
    ref = sps.bootstrap((x,), np.mean, n_resamples=RESAMPLES, confidence_level=0.95, method="percentile",
                        random_state=np.random.default_rng(1000 + seed)).confidence_interval
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert abs(low - ref.low) < TOLERANCE_SE * se and abs(high - ref.high) < TOLERANCE_SE * se
    assert low < x.mean() < high


def test_interval_is_seeded_and_follows_the_confidence():
    x = _datasets()["skewed"]
    assert stats.bootstrap_interval(x, 2000, seed=3) == stats.bootstrap_interval(x, 2000, seed=3)
    assert stats.bootstrap_interval(x, 2000, seed=3) != stats.bootstrap_interval(x, 2000, seed=4)
    lo90, hi90 = stats.bootstrap_interval(x, 4000, 0.90, seed=0)
    lo99, hi99 = stats.bootstrap_interval(x, 4000, 0.99, seed=0)
    assert lo99 < lo90 and hi90 < hi99  # the same draws: nested quantiles


def test_interval_covers_the_mean_about_95_percent_of_the_time():
    """Coverage over 300 normal samples of 40 (the percentile interval is slightly short at small n)."""
    rng = np.random.default_rng(5)
    hits = 0
    for i in range(300):
        low, high = stats.bootstrap_interval(rng.normal(1.0, 2.0, 40), 1000, 0.95, seed=i)
        hits += low <= 1.0 <= high
    assert 0.88 <= hits / 300 <= 0.99


def test_interval_edge_cases():
    assert all(np.isnan(stats.bootstrap_interval([])))
    assert stats.bootstrap_interval([0.25]) == (0.25, 0.25)
    assert stats.bootstrap_interval([2.0] * 7) == (2.0, 2.0)
    with pytest.raises(ValueError, match="finite"):
        stats.bootstrap_interval([1.0, np.nan])
    mean, low, high = stats.mean_with_interval([1.0, np.nan, 3.0, 2.0], 500)
    assert mean == 2.0 and low <= mean <= high


@pytest.mark.parametrize("n,shift", [(12, 0.0), (30, 0.4), (200, 0.05)])
def test_paired_comparison_against_scipy(n, shift):
    rng = np.random.default_rng(n)
    a = rng.normal(0.4, 0.2, n)
    b = a + shift + rng.normal(0, 0.3, n)
    a[1], b[2] = np.nan, np.inf  # pairs with an undefined side are left out
    out = stats.paired_comparison(a, b, RESAMPLES, 0.95, seed=0)
    keep = np.isfinite(a) & np.isfinite(b)
    d = b[keep] - a[keep]
    assert out.num_pairs == n - 2
    assert out.diff == pytest.approx(d.mean(), rel=1e-12)
    assert out.mean_a == pytest.approx(a[keep].mean()) and out.mean_b == pytest.approx(b[keep].mean())
    assert out.wilcoxon_p == pytest.approx(sps.wilcoxon(b[keep], a[keep]).pvalue, rel=1e-12)
    ref = sps.bootstrap((d,), np.mean, n_resamples=RESAMPLES, method="percentile",
                        random_state=np.random.default_rng(9)).confidence_interval
    se = d.std(ddof=1) / np.sqrt(d.size)
    assert abs(out.diff_low - ref.low) < TOLERANCE_SE * se and abs(out.diff_high - ref.high) < TOLERANCE_SE * se


def test_paired_comparison_edge_cases():
    same = stats.paired_comparison([1.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    assert same.diff == 0 and same.wilcoxon_p == 1.0 and (same.diff_low, same.diff_high) == (0.0, 0.0)
    none = stats.paired_comparison([np.nan], [1.0])
    assert none.num_pairs == 0 and np.isnan(none.wilcoxon_p)
    # binary outcomes (accuracy): ties of |d| handled as scipy does
    a = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 1, 0, 0], float)
    b = np.array([1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0], float)
    assert stats.paired_comparison(a, b).wilcoxon_p == pytest.approx(sps.wilcoxon(b - a).pvalue)
    with pytest.raises(ValueError, match="same shape"):
        stats.paired_comparison([1.0], [1.0, 2.0])


def test_t_interval_is_scipys():
    values = [0.91, 0.95, 0.88, 0.97]
    mean, low, high = stats.t_interval(values)
    sem = np.std(values, ddof=1) / np.sqrt(4)
    want = sps.t.interval(0.95, 3, loc=np.mean(values), scale=sem)
    np.testing.assert_allclose([low, high], want, rtol=1e-12)
    assert mean == pytest.approx(np.mean(values))
    assert np.isnan(stats.t_interval([1.0])[1])
