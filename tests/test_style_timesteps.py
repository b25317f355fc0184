"""train.timestep_sampling: style biases the noise levels toward high noise, as documented in
flux_math.style_sigmas: sigma = 1 - u**3, so P(sigma <= s) = 1 - (1 - s)**(1/3)."""

import pytest
import torch
from scipy import stats

from impressionist.flux_math import TimestepSampling, sample_sigmas

DRAWS = 200_000


def style_cdf(s):
    return 1 - (1 - s) ** (1 / 3)


def test_style_sigmas_follow_the_documented_distribution():
    sigmas = sample_sigmas(TimestepSampling("style"), DRAWS, 4096, torch.Generator().manual_seed(0)).double()
    assert sigmas.min() > 0 and sigmas.max() <= 1
    # Kolmogorov-Smirnov against the documented CDF: with 2e5 draws a wrong law (u**3, a uniform,
    # 1 - u**2) gives p far below 1e-6; the right one passes with p ~ U(0, 1) (seeded here).
    assert stats.kstest(sigmas.numpy(), style_cdf).pvalue > 1e-3
    # the documented summary: mean 3/4 (variance 1/7 - 1/16 = 9/112: standard error ~0.0006 here)
    standard_error = sigmas.std().item() / DRAWS ** 0.5
    assert abs(sigmas.mean().item() - 0.75) < 5 * standard_error
    assert sigmas.median().item() == pytest.approx(0.875, abs=0.005)
    assert (sigmas > 0.5).double().mean().item() == pytest.approx(0.5 ** (1 / 3), abs=0.005)


def test_style_moves_sigma_toward_high_noise_against_the_other_samplings():
    generator = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    style = sample_sigmas(TimestepSampling("style"), DRAWS, 4096, generator())
    for method in ("uniform", "logit_normal"):
        other = sample_sigmas(TimestepSampling(method), DRAWS, 4096, generator())
        # one-sided: style's draws are stochastically larger (Mann-Whitney U)
        assert stats.mannwhitneyu(style.numpy(), other.numpy(), alternative="greater").pvalue < 1e-12
        assert style.mean() > other.mean() + 0.2


def test_style_sampling_is_seeded():
    a = sample_sigmas(TimestepSampling("style"), 64, 1024, torch.Generator().manual_seed(3))
    b = sample_sigmas(TimestepSampling("style"), 64, 1024, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
