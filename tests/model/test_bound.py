"""The bound term by term (``BoundChain``) and progressive coding's rate-distortion accounting, against closed forms
and against ``GaussianDiffusion.calc_bpd_loop``."""

from __future__ import annotations

import math

import pytest
import torch

from model.bound import BoundChain, Likelihood, curve, likelihood, rd_grid
from model.config import DiffusionConfig
from model.diffusion import GaussianDiffusion
from model.sampler import Chain, ImageNoise, image_seed, sample_steps
from model.unet import UNet
from tests.model.test_sampler import point_denoiser

SHAPE = (3, 8, 8)
T = 30


@pytest.fixture
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=T))


def on_grid(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random 8-bit images in [-1, 1], with some pixels at the edge bins (0 and 255)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *SHAPE), generator=g)
    x[:, 0, 0, :2] = torch.tensor([0, 255])
    return x.float() / 127.5 - 1.0


# ---- the same numbers as calc_bpd_loop (what ddpm eval --full-bound computed before) ---------------------------
def test_one_image_matches_calc_bpd_loop_exactly(diffusion: GaussianDiffusion, random_unet: UNet) -> None:
    x0 = on_grid(1)
    ours = likelihood(random_unet, diffusion, x0, seed=5, first_index=3)
    # Image 3 of seed 5 draws its q-noise from one generator, in calc_bpd_loop's order (t = T-1 .. 0).
    ref = diffusion.calc_bpd_loop(random_unet, x0, generator=torch.Generator().manual_seed(image_seed(5, 3)))
    assert torch.equal(ours.terms, ref.terms) and torch.equal(ours.prior, ref.prior)
    torch.testing.assert_close(ours.bits_per_dim, ref.total, rtol=1e-6, atol=0)
    assert ours.terms.shape == (1, T) and bool((ours.terms > -1e-6).all())


def test_the_bound_clips_x0_hat_by_default_as_the_official_evaluation(diffusion: GaussianDiffusion,
                                                                     random_unet: UNet) -> None:
    x0 = on_grid(2)
    clipped = likelihood(random_unet, diffusion, x0, seed=1)
    assert torch.equal(clipped.terms, likelihood(random_unet, diffusion, x0, seed=1, clip_denoised=True).terms)
    raw = likelihood(random_unet, diffusion, x0, seed=1, clip_denoised=False)
    assert not torch.allclose(clipped.terms, raw.terms)  # a random network predicts x0 outside [-1, 1]
    ref = diffusion.calc_bpd_loop(random_unet, x0[:1], generator=torch.Generator().manual_seed(image_seed(1, 0)),
                                  clip_denoised=False)
    alone = likelihood(random_unet, diffusion, x0[:1], seed=1, clip_denoised=False)
    assert torch.equal(alone.terms, ref.terms)


# ---- closed forms with the exact denoiser ------------------------------------------------------------------------
def _phi(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def test_terms_of_the_exact_denoiser_are_the_variance_mismatch_and_the_decoder_mass() -> None:
    """Data = one image c and eps exact: p's mean is the posterior mean, so with sigma^2 = beta (fixedlarge)
    L_t = (log(beta_t / beta~_t) + beta~_t / beta_t - 1) / (2 ln 2) per dimension, L_0 is -log2 of the mass of
    N(c, sigma_1^2) over c's bin, and every x0-hat is c (no distortion at any t)."""
    d = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=T, variance="fixedlarge"))
    c = on_grid(1, seed=3)
    lik = likelihood(point_denoiser(d, c), d, c.expand(2, *SHAPE), seed=0)
    a = d.arrays64
    beta, post = a["betas"][1:], a["posterior_variance"][1:]
    kl = (torch.log(beta / post) + post / beta - 1.0) / (2 * math.log(2.0))
    torch.testing.assert_close(lik.terms[:, 1:].double(), kl.expand(2, T - 1), rtol=2e-4, atol=1e-6)
    sigma = math.sqrt(float(a["posterior_variance"][1]))  # fixedlarge's first variance is beta~ of the second step
    lo = torch.where(c < -0.999, torch.full_like(c, -math.inf), (-1.0 / 255) / sigma * torch.ones_like(c))
    hi = torch.where(c > 0.999, torch.full_like(c, math.inf), (1.0 / 255) / sigma * torch.ones_like(c))
    decoder = -torch.log2((_phi(hi) - _phi(lo)).double()).mean()
    # The official code's tanh approximation of Phi is kept (for comparable bits/dim): equal to about 1e-3.
    assert lik.terms[0, 0].item() == pytest.approx(decoder.item(), rel=2e-3)
    assert lik.mse.abs().max().item() < 1e-10  # float rounding only
    assert lik.distortion().max().item() < 1e-4


def test_prior_term_is_the_kl_of_q_at_T_from_the_standard_normal(diffusion: GaussianDiffusion,
                                                                random_unet: UNet) -> None:
    x0 = on_grid(2)
    lik = likelihood(random_unet, diffusion, x0, seed=0)
    abar = float(diffusion.arrays64["alphas_cumprod"][-1])
    kl = 0.5 * (-1.0 - math.log(1 - abar) + (1 - abar) + abar * x0.double() ** 2)
    torch.testing.assert_close(lik.prior.double(), kl.mean(dim=(1, 2, 3)) / math.log(2.0), rtol=1e-4, atol=1e-7)


# ---- rate-distortion accounting ----------------------------------------------------------------------------------
def test_rate_is_the_bits_received_once_x_t_is_and_distortion_the_x0_hat_rmse() -> None:
    g = torch.Generator().manual_seed(0)
    lik = Likelihood(prior=torch.tensor([1e-5, 2e-5]), terms=torch.rand(2, 6, generator=g),
                     mse=torch.rand(2, 6, generator=g) * 0.1)
    rate = lik.rate()
    for t in range(1, 7):  # paper time t: L_T + L_{T-1} + ... + L_t
        torch.testing.assert_close(rate[:, t - 1], lik.prior + lik.terms[:, t:].sum(1))
    torch.testing.assert_close(rate[:, -1], lik.prior)  # t = T: only x_T sent
    torch.testing.assert_close(rate[:, 0], lik.bits_per_dim - lik.terms[:, 0])  # t = 1: all but the decoder
    assert bool((rate[:, :-1] >= rate[:, 1:]).all())
    torch.testing.assert_close(lik.distortion(), 127.5 * lik.mse.sqrt())
    points = curve(lik, [1, 3, 6])
    assert [p.t for p in points] == [1, 3, 6]
    assert points[1].rate == pytest.approx(float(rate[:, 2].double().mean()))
    assert points[1].distortion == pytest.approx(127.5 * math.sqrt(float(lik.mse[:, 2].double().mean())))
    with pytest.raises(ValueError, match=r"1\.\.6"):
        curve(lik, [0])
    assert rd_grid(1000, 5) == [1, 251, 501, 750, 1000] and rd_grid(4) == [1, 2, 3, 4]


def test_distortion_grows_with_t_on_a_denoiser_that_knows_the_data_only_roughly(diffusion: GaussianDiffusion
                                                                                ) -> None:
    c = on_grid(1, seed=1)
    exact = point_denoiser(diffusion, c)

    def rough(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # eps a little off: x0-hat error ~ noise level
        return 0.9 * exact(x_t, t)

    lik = likelihood(rough, diffusion, c.expand(4, *SHAPE), seed=0)
    dist = curve(lik)
    assert dist[0].distortion < 5 < dist[-1].distortion  # x0-hat(x_1) is close to c; from x_T it is not
    assert dist[0].rate > dist[-1].rate


# ---- the step-driven object --------------------------------------------------------------------------------------
def test_bound_chain_steps_down_every_timestep_with_previews(diffusion: GaussianDiffusion, random_unet: UNet
                                                             ) -> None:
    x0 = on_grid(2)
    chain = BoundChain(diffusion, x0, seed=0)
    assert chain.total == T and chain.batch_size == 2
    with pytest.raises(RuntimeError, match="not finished"):
        chain.result()
    steps = list(sample_steps(random_unet, chain, x0_every=10))
    assert [s.t for s in steps] == list(range(T - 1, -1, -1)) and steps[-1].is_last and chain.done
    previews = [s for s in steps if s.x0_hat is not None]
    assert [s.index for s in previews] == [0, 10, 20, T - 1]
    s = previews[1]
    x_t, t = s.x_t, torch.full((2,), s.t)
    with torch.inference_mode():
        expected = diffusion.predict_x0_from_eps(x_t, t, random_unet(x_t, t)).clamp(-1, 1)
    torch.testing.assert_close(s.x0_hat, expected)  # the receiver's view at that t
    torch.testing.assert_close(s.mse, ((expected - x0) ** 2).mean(dim=(1, 2, 3)))
    assert torch.equal(chain.result().terms[:, s.t], s.term)
    with pytest.raises(RuntimeError, match="already"):
        chain.step(torch.zeros(2, *SHAPE))


def test_the_q_samples_are_draws_of_q_at_each_t_from_the_images_streams(diffusion: GaussianDiffusion) -> None:
    x0 = on_grid(2)
    chain = BoundChain(diffusion, x0, seed=9, indices=[4, 7])
    streams = ImageNoise.for_images(9, [4, 7], SHAPE)
    for t in range(T - 1, T - 4, -1):
        x_t, t_in = chain.model_input()
        assert torch.equal(t_in, torch.full((2,), t))
        abar = diffusion.arrays64["alphas_cumprod"][t]
        expected = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * streams.draw()
        torch.testing.assert_close(x_t, expected)
        chain.step(torch.zeros(2, *SHAPE))


@pytest.mark.filterwarnings("ignore:TF32")
def test_an_images_terms_do_not_depend_on_its_batch(diffusion: GaussianDiffusion, random_unet: UNet) -> None:
    x0 = on_grid(3)
    with torch.backends.mkldnn.flags(enabled=False):  # native convolutions: each row computed alone
        batch = likelihood(random_unet, diffusion, x0, seed=2)
        alone = likelihood(random_unet, diffusion, x0[2:], seed=2, first_index=2)
        again = likelihood(random_unet, diffusion, x0, seed=2)
    assert torch.equal(batch.terms[2:], alone.terms) and torch.equal(batch.mse[2:], alone.mse)
    assert torch.equal(batch.terms, again.terms)
    other_seed = likelihood(random_unet, diffusion, x0, seed=3)
    assert not torch.equal(batch.terms, other_seed.terms)


@pytest.mark.filterwarnings("ignore:TF32")
def test_a_bound_and_a_sampling_chain_share_one_forward_pass(diffusion: GaussianDiffusion, random_unet: UNet
                                                             ) -> None:
    """What the batching engine does: concatenate both objects' inputs, one forward, split eps back."""
    x0 = on_grid(2)

    def chain() -> Chain:
        return Chain(diffusion, ImageNoise.for_images(1, range(3), SHAPE), steps=T)

    with torch.backends.mkldnn.flags(enabled=False):
        bound, sampler = BoundChain(diffusion, x0, seed=4), chain()
        with torch.inference_mode():
            while not bound.done:
                (xa, ta), (xb, tb) = bound.model_input(), sampler.model_input()
                eps = random_unet(torch.cat([xa, xb]), torch.cat([ta, tb]))
                bound.step(eps[:2])
                last = sampler.step(eps[2:])
        alone = likelihood(random_unet, diffusion, x0, seed=4)
        images = list(sample_steps(random_unet, chain()))[-1].x_prev
    assert torch.equal(bound.result().terms, alone.terms)
    assert torch.equal(last.x_prev, images)


def test_bad_images_are_refused(diffusion: GaussianDiffusion) -> None:
    off = on_grid(1)
    off[off > 0] -= 0.001
    with pytest.raises(ValueError, match="8-bit grid"):
        BoundChain(diffusion, off, seed=0)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        BoundChain(diffusion, on_grid(1) * 2, seed=0)
    with pytest.raises(ValueError, match="indices"):
        BoundChain(diffusion, on_grid(2), seed=0, indices=[0])
    with pytest.raises(ValueError, match="B, C, H, W"):
        BoundChain(diffusion, torch.zeros(8, 8), seed=0)
