"""The diffusion maths against closed forms: schedules, q, the posterior, eps <-> x0, the reverse step, the bound."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import DiffusionConfig
from model.diffusion import GaussianDiffusion, cosine_betas, discretized_gaussian_log_likelihood, linear_betas


@pytest.fixture
def paper() -> GaussianDiffusion:
    """The paper's process: linear betas 1e-4..0.02, T = 1000."""
    return GaussianDiffusion.from_config(DiffusionConfig())


@pytest.fixture
def short() -> GaussianDiffusion:
    return GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=50))


def point_denoiser(d: GaussianDiffusion, c: torch.Tensor):  # type: ignore[no-untyped-def]
    """The exact eps of a data distribution concentrated on the single image ``c``."""
    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x_t - d._extract(d.sqrt_alphas_cumprod, t, 4) * c) / d._extract(d.sqrt_one_minus_alphas_cumprod, t, 4)
    return eps_fn


# ---- schedules -------------------------------------------------------------------------------------------------
def test_linear_schedule_endpoints_and_precision(paper: GaussianDiffusion) -> None:
    assert paper.betas.dtype == torch.float32 and paper.betas.shape == (1000,)
    assert paper.arrays64["betas"][0].item() == pytest.approx(1e-4, abs=1e-15)
    assert paper.arrays64["betas"][-1].item() == pytest.approx(0.02, abs=1e-15)
    steps = paper.arrays64["betas"].diff()
    torch.testing.assert_close(steps, torch.full_like(steps, (0.02 - 1e-4) / 999), rtol=1e-9, atol=0)
    # Computed in float64, then stored as float32: the cumulative product is not accumulated in float32.
    abar64 = torch.cumprod(1.0 - linear_betas(1000), 0)
    assert torch.equal(paper.alphas_cumprod, abar64.float())
    assert paper.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.01)


def test_cosine_schedule_follows_its_closed_form() -> None:
    d = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=100, beta_schedule="cosine"))
    t = torch.arange(1, 101, dtype=torch.float64) / 100
    f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(d.arrays64["alphas_cumprod"][:-1], f[:-1], rtol=1e-9, atol=0)
    assert cosine_betas(100).max().item() == pytest.approx(0.999)  # the last beta is capped


def test_posterior_variance_and_both_reverse_variances(short: GaussianDiffusion) -> None:
    a = short.arrays64
    expected = (1 - a["alphas_cumprod_prev"]) / (1 - a["alphas_cumprod"]) * a["betas"]
    torch.testing.assert_close(a["posterior_variance"], expected, rtol=1e-12, atol=0)
    assert a["posterior_variance"][0] == 0 and bool((a["posterior_variance"][1:] < a["betas"][1:]).all())
    small, log_small = short.variance_of("fixedsmall")
    large, log_large = short.variance_of("fixedlarge")
    torch.testing.assert_close(large[1:], short.betas[1:])
    # Index 0 uses beta~ of index 1 (official code) so the decoder's log-variance is finite.
    assert large[0] == small[1] and torch.isfinite(log_small).all() and torch.isfinite(log_large).all()


def test_invalid_schedules_and_options_are_refused() -> None:
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="variance"):
        GaussianDiffusion(linear_betas(10), variance="learned")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta_schedule"):
        DiffusionConfig(beta_schedule="quadratic")  # type: ignore[arg-type]


# ---- forward process and eps <-> x0 -----------------------------------------------------------------------------
def test_q_sample_has_the_closed_form_moments(paper: GaussianDiffusion) -> None:
    x0 = torch.tensor([-0.9, -0.2, 0.4, 1.0]).reshape(1, 4, 1, 1)
    gen = torch.Generator().manual_seed(0)
    for t in (0, 300, 999):
        noise = torch.randn(40_000, 4, 1, 1, generator=gen)
        x_t = paper.q_sample(x0.expand_as(noise), torch.full((40_000,), t), noise)
        abar = paper.alphas_cumprod[t]
        torch.testing.assert_close(x_t.mean(0), abar.sqrt() * x0[0], atol=0.02, rtol=0)
        torch.testing.assert_close(x_t.var(0), (1 - abar).expand(4, 1, 1), atol=0.02 * (1 - abar) + 1e-6, rtol=0)


def test_x0_round_trip_with_the_true_noise(paper: GaussianDiffusion) -> None:
    x0 = torch.rand(6, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    x_t = paper.q_sample(x0, t, noise)
    torch.testing.assert_close(paper.predict_x0_from_eps(x_t, t, noise), x0, atol=2e-4, rtol=0)
    torch.testing.assert_close(paper.predict_eps_from_x0(x_t, t, x0), noise, atol=1e-4, rtol=1e-4)


def test_training_loss_is_zero_for_the_true_noise(short: GaussianDiffusion) -> None:
    x0, noise = torch.rand(4, 3, 4, 4) * 2 - 1, torch.randn(4, 3, 4, 4)
    t = torch.tensor([0, 10, 20, 49])
    assert torch.equal(short.training_losses(lambda x, t: noise, x0, t, noise), torch.zeros(4))
    torch.testing.assert_close(short.training_losses(lambda x, t: torch.zeros_like(x), x0, t, noise),
                               (noise**2).mean(dim=(1, 2, 3)))


# ---- reverse step -----------------------------------------------------------------------------------------------
def test_reverse_mean_without_clipping_is_eq_11(short: GaussianDiffusion) -> None:
    x_t, eps = 2 * torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t = torch.tensor([1, 5, 20, 40, 49])
    out = short.p_mean_variance_from_eps(x_t, t, eps, clip_denoised=False)
    a = short.arrays64
    alpha, beta, abar = (a[k][t].float().reshape(-1, 1, 1, 1) for k in ("alphas", "betas", "alphas_cumprod"))
    eq11 = (x_t - beta / (1 - abar).sqrt() * eps) / alpha.sqrt()
    torch.testing.assert_close(out.mean, eq11, atol=1e-5, rtol=1e-5)


def test_clipping_bounds_x0_hat_and_no_noise_is_added_at_t0(short: GaussianDiffusion) -> None:
    x_t, eps = 3 * torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([0, 30])
    x_prev, x0_hat = short.p_sample_from_eps(x_t, t, eps, torch.randn(2, 3, 4, 4), clip_denoised=True)
    assert x0_hat.abs().max() <= 1.0
    # At index 0 the step is the posterior mean of x0-hat, which is x0-hat itself: no noise.
    torch.testing.assert_close(x_prev[0], x0_hat[0])


# ---- the bound --------------------------------------------------------------------------------------------------
def test_prior_term_of_the_papers_schedule_is_about_1e_5_bits_per_dim(paper: GaussianDiffusion) -> None:
    x0 = torch.rand(16, 3, 32, 32) * 2 - 1
    prior = paper.prior_bpd(x0)
    assert prior.shape == (16,)
    assert 3e-6 < prior.mean().item() < 3e-5


def test_discretized_gaussian_sums_to_one_over_the_256_bins() -> None:
    bins = torch.linspace(-1, 1, 256)
    for mean, log_scale in ((0.0, math.log(0.05)), (-0.97, math.log(0.3)), (0.5, math.log(0.004))):
        ll = discretized_gaussian_log_likelihood(bins, torch.full((256,), mean), torch.full((256,), log_scale))
        assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_bound_terms_vanish_for_the_exact_denoiser() -> None:
    d = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=20, variance="fixedsmall"))
    c = (torch.randint(0, 256, (1, 3, 4, 4)) / 127.5 - 1).expand(2, 3, 4, 4)
    vb = d.calc_bpd_loop(point_denoiser(d, c), c, generator=torch.Generator().manual_seed(0))
    assert vb.terms.shape == (2, 20) and vb.mse.shape == (2, 20)
    # Same mean, same (fixedsmall) variance: every KL term L_{t-1}, t > 1, is zero; the total adds up.
    assert vb.terms[:, 1:].abs().max().item() < 1e-4
    torch.testing.assert_close(vb.total, vb.prior + vb.terms.sum(1))
    assert bool((vb.terms[:, 0] > 0).all())  # the decoder still pays for its Gaussian spread
