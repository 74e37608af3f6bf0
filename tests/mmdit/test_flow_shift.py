"""The train-time timestep shift: the shifted sigma densities against their closed forms.

If s ~ p(s) and s' = a s / (1 + (a - 1) s), then s = s' / (a - (a - 1) s') and
p'(s') = p(s(s')) * a / (a - (a - 1) s')**2 (change of variables). The sampler's histogram must
match that density (binned chi-square, fixed seed, 99.9% bound that a 5% error in alpha
exceeds threefold) and its closed-form CDF (Kolmogorov-Smirnov).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from mmdit import flow

N = 200_000
BINS = 50
EDGES = np.linspace(0.0, 1.0, BINS + 1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unshift(x: np.ndarray, a: float) -> np.ndarray:
    return x / (a - (a - 1) * x)


def shifted_logit_normal_pdf(x: np.ndarray, a: float, m: float = 0.0, s: float = 1.0):
    """p'(x) by the change of variables from the logit-normal p."""
    u = unshift(x, a)
    p = stats.norm.pdf((np.log(u) - np.log1p(-u) - m) / s) / (s * u * (1 - u))
    return p * a / (a - (a - 1) * x) ** 2


def shifted_logit_normal_cdf(x, a: float, m: float = 0.0, s: float = 1.0):
    u = unshift(np.asarray(x, dtype=np.float64), a)
    return stats.norm.cdf((np.log(u) - np.log1p(-u) - m) / s)


def expected_counts(a: float, m: float = 0.0, s: float = 1.0) -> np.ndarray:
    """N x the density integrated over each bin (Simpson's rule, 64 panels per bin)."""
    out = np.empty(BINS)
    for i in range(BINS):
        lo, hi = EDGES[i], EDGES[i + 1]
        x = np.linspace(max(lo, 1e-12), min(hi, 1 - 1e-12), 129)
        y = shifted_logit_normal_pdf(x, a, m, s)
        h = (x[-1] - x[0]) / 128
        out[i] = h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())
    return N * out


def chi_square(sample: torch.Tensor, expected: np.ndarray) -> float:
    observed, _ = np.histogram(sample.double().numpy(), EDGES)
    keep = expected > 5  # the chi-square approximation needs populated bins
    assert keep.sum() > 20
    return float((((observed - expected) ** 2 / expected)[keep]).sum()), int(keep.sum())


@pytest.mark.parametrize(("alpha", "m", "s"), [(3.0, 0.0, 1.0), (0.5, 0.0, 1.0), (2.0, 0.4, 0.8)])
def test_shifted_logit_normal_histogram_matches_the_change_of_variables_density(alpha, m, s):
    sample = flow.sample_sigmas(
        N, "logit_normal", logit_mean=m, logit_std=s, generator=_gen(1), shift=alpha
    )
    assert sample.dtype == torch.float32 and bool(((sample > 0) & (sample < 1)).all())
    value, bins = chi_square(sample, expected_counts(alpha, m, s))
    bound = stats.chi2.ppf(0.999, bins - 1)
    assert value < bound, (value, bound)
    # The same draws against the density of a 5% different alpha are rejected.
    wrong, _ = chi_square(sample, expected_counts(alpha * 1.05, m, s))
    assert wrong > 3 * bound, wrong
    ks = stats.kstest(sample.double().numpy(), lambda x: shifted_logit_normal_cdf(x, alpha, m, s))
    assert ks.pvalue > 1e-3, ks


def test_resolution_rule_alpha_and_its_density():
    # SD3: alpha = shift * sqrt(h * w) / base; the base bucket gets the plain shift.
    assert flow.resolution_shift(3.0, 0, 1024, 1024) == 3.0
    assert flow.resolution_shift(1.0, 256, 256, 256) == 1.0
    assert flow.resolution_shift(3.0, 256, 1024, 1024) == 12.0
    assert flow.resolution_shift(1.0, 256, 512, 256) == pytest.approx(math.sqrt(2), abs=1e-15)
    assert flow.resolution_shift(2.0, 512, 256, 256) == 1.0  # smaller than the base: < shift
    alpha = flow.resolution_shift(1.0, 32, 64, 64)  # a 64 px bucket, base 32: alpha 2
    assert alpha == 2.0
    sample = flow.sample_sigmas(N, "logit_normal", generator=_gen(2), shift=alpha)
    value, bins = chi_square(sample, expected_counts(2.0))
    assert value < stats.chi2.ppf(0.999, bins - 1)


def test_alpha_one_is_the_identity_bit_for_bit():
    for density in flow.DENSITIES:
        plain = flow.sample_sigmas(1000, density, generator=_gen(4))
        same = flow.sample_sigmas(1000, density, generator=_gen(4), shift=1.0)
        assert torch.equal(plain, same)
    sigma = torch.rand(100, generator=_gen(5))
    assert torch.equal(flow.shift_sigmas(sigma, 1.0), sigma)


def test_median_of_the_shifted_logit_normal_is_the_shifted_half():
    for alpha in (0.5, 1.0, 3.0, 12.0):
        median = flow.shift_sigmas(0.5, alpha)
        assert median == alpha / (1 + alpha)
        # Closed form: the CDF at shift(0.5) is Phi(logit(0.5)) = 1/2 (up to float64 rounding
        # of the inverse map).
        assert shifted_logit_normal_cdf(median, alpha) == pytest.approx(0.5, abs=1e-14)
        sample = flow.sample_sigmas(N, "logit_normal", generator=_gen(6), shift=alpha)
        # Sample median: standard error 1 / (2 p(median) sqrt(N)).
        se = 1 / (2 * shifted_logit_normal_pdf(np.array([median]), alpha)[0] * math.sqrt(N))
        assert abs(sample.median().item() - median) < 5 * se


def test_training_loss_applies_the_shift_to_the_drawn_sigma_only():
    x0 = torch.randn(64, 4, 2, 2, generator=_gen(7))
    ctx, pooled = torch.zeros(64, 3, 8), torch.zeros(64, 8)

    def zero(x, sigma, context, pooled):
        return torch.zeros_like(x)

    _, plain = flow.training_loss(zero, x0, context=ctx, pooled=pooled, generator=_gen(8))
    _, shifted = flow.training_loss(
        zero, x0, context=ctx, pooled=pooled, generator=_gen(8), shift=3.0
    )
    torch.testing.assert_close(shifted, flow.shift_sigmas(plain, 3.0), rtol=0, atol=1e-6)
    given = torch.full((64,), 0.25)
    _, used = flow.training_loss(zero, x0, context=ctx, pooled=pooled, sigma=given, shift=3.0)
    assert torch.equal(used, given)  # a given sigma (validation grid) is never shifted
    with pytest.raises(ValueError, match="shift"):
        flow.sample_sigmas(4, shift=0.0)


def test_matched_sampling_shift():
    # eval.shift > 0 wins; 0 follows the training run at the sampling size.
    assert flow.matched_shift(3.0, 1.0, 0, 512, 512) == 3.0
    assert flow.matched_shift(0.0, 1.0, 0, 512, 512) == 1.0
    assert flow.matched_shift(0.0, 2.0, 0, 1024, 1024) == 2.0
    assert flow.matched_shift(0.0, 1.0, 256, 1024, 1024) == 4.0
