"""Reconstruction, variation and interpolation: q at t, where the chain starts, what small and large t give back,
the noise streams, and the λ endpoints."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import DiffusionConfig
from model.diffusion import GaussianDiffusion
from model.latents import (
    LATENT_STREAM,
    encode,
    interpolate,
    interpolation_chain,
    reconstruct,
    reconstruction_chain,
)
from model.sampler import Chain, ImageNoise, image_seed, sample, sample_steps
from model.unet import UNet
from tests.model.test_sampler import point_denoiser

SHAPE = (3, 8, 8)


@pytest.fixture
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=50))


@pytest.fixture
def paper() -> GaussianDiffusion:
    """T = 1000 and the paper's betas: abar_T = 4e-5, so x_T keeps 0.6% of the image."""
    return GaussianDiffusion.from_config(DiffusionConfig())


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8


# ---- q at t ------------------------------------------------------------------------------------------------------
def test_encode_is_q_at_the_papers_timestep(paper: GaussianDiffusion) -> None:
    x0 = images(1)
    abar = paper.arrays64["alphas_cumprod"]
    for t in (1, 500, 1000):  # paper time t is index t - 1
        assert torch.allclose(encode(paper, x0, t, torch.zeros_like(x0)), math.sqrt(abar[t - 1]) * x0)
        torch.testing.assert_close(encode(paper, torch.zeros_like(x0), t, torch.ones_like(x0)),
                                   torch.full_like(x0, math.sqrt(1 - abar[t - 1])))
    # Many draws: mean sqrt(abar_t) x0, variance 1 - abar_t (Eq. 4).
    noise = torch.randn(20000, *SHAPE, generator=torch.Generator().manual_seed(0))
    x_t = encode(paper, x0.expand(20000, *SHAPE), 300, noise)
    torch.testing.assert_close(x_t.mean(0), math.sqrt(abar[299]) * x0[0], atol=0.03, rtol=0)
    assert x_t.var(0).mean().item() == pytest.approx(1 - float(abar[299]), rel=0.02)


def test_the_chain_starts_from_q_with_the_images_first_draw_and_counts_steps_from_start_t(
        diffusion: GaussianDiffusion) -> None:
    x0 = images(2)
    chain = reconstruction_chain(diffusion, x0, start_t=20, seed=3, indices=[5, 6], steps=7)
    streams = ImageNoise.for_images(3, [5, 6], SHAPE)
    x_t, t = chain.model_input()
    torch.testing.assert_close(x_t, encode(diffusion, x0, 20, streams.draw()))
    assert torch.equal(t, torch.tensor([19, 19]))
    assert chain.total == 7 and chain.timesteps[0] == 19 and chain.timesteps[-1] == 0
    full = reconstruction_chain(diffusion, x0, start_t=20, seed=3)
    assert full.total == 20 and full.timesteps == list(range(19, -1, -1))
    # The chain's own noise continues the same streams after the q-noise.
    assert torch.equal(chain.noise.draw(), streams.draw())


def test_shared_latent_gives_every_image_the_same_x_t(diffusion: GaussianDiffusion, random_unet: UNet) -> None:
    x0 = images(1)
    chain = reconstruction_chain(diffusion, x0, start_t=30, seed=2, indices=range(3), shared_latent=True)
    x_t, _ = chain.model_input()
    latent = ImageNoise.for_images(2, [LATENT_STREAM], SHAPE).draw()
    torch.testing.assert_close(x_t, encode(diffusion, x0, 30, latent).expand(3, *SHAPE))
    out = list(sample_steps(random_unet, chain))[-1].x_prev
    assert not torch.allclose(out[0], out[1])  # different reverse noise: different samples of p(x0 | x_t)
    ddim = reconstruction_chain(diffusion, x0, start_t=30, seed=2, indices=range(3), shared_latent=True,
                                sampler="ddim", steps=10)
    out = list(sample_steps(random_unet, ddim))[-1].x_prev
    torch.testing.assert_close(out[0], out[2])  # deterministic decoder, same x_t: one answer


# ---- what comes back ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sampler", "start_t", "steps"), [("ddpm", 50, None), ("ddpm", 30, 6), ("ddim", 40, 8),
                                                          ("ddpm", 1, None)])
def test_the_exact_denoiser_reconstructs_the_image_from_any_t(diffusion: GaussianDiffusion, sampler: str,
                                                              start_t: int, steps: int | None) -> None:
    c = images(1, seed=4)
    out = reconstruct(point_denoiser(diffusion, c), diffusion, c, start_t=start_t, num_images=3, seed=1,
                      steps=steps, sampler=sampler)
    torch.testing.assert_close(out, c.expand(3, *SHAPE), atol=1e-4, rtol=0)


def test_small_t_gives_the_image_back_and_large_t_forgets_it(paper: GaussianDiffusion, random_unet: UNet) -> None:
    x0 = images(2)
    err = {}
    for t in (1, 100, 1000):
        out = reconstruct(random_unet, paper, x0, start_t=t, seed=0, steps=min(t, 10))
        err[t] = (out - x0).abs().mean().item()
    # t = 1: x0-hat = x0 + sqrt(beta_1 / (1 - beta_1)) (eps - eps_theta), a 1% perturbation of the noise's error.
    assert err[1] < 0.02 < err[100] < err[1000]


def test_at_t_equal_T_the_image_is_all_but_ignored(paper: GaussianDiffusion, random_unet: UNet) -> None:
    a, b = images(1, seed=1), images(1, seed=2)
    from_a = reconstruct(random_unet, paper, a, start_t=1000, seed=5, steps=10)
    from_b = reconstruct(random_unet, paper, b, start_t=1000, seed=5, steps=10)
    other_seed = reconstruct(random_unet, paper, a, start_t=1000, seed=6, steps=10)
    generated = sample(random_unet, paper, 1, SHAPE, seed=5, steps=10)
    gap = (from_a - other_seed).abs().mean().item()
    assert (from_a - from_b).abs().mean().item() < gap / 20  # x_T keeps sqrt(abar_T) = 0.6% of the image
    assert (from_a - generated).abs().mean().item() < gap / 20  # and is then a draw of the prior, as sampling's


@pytest.mark.filterwarnings("ignore:TF32")
def test_image_i_is_the_same_whatever_the_batch(diffusion: GaussianDiffusion, random_unet: UNet) -> None:
    x0 = images(3)
    with torch.backends.mkldnn.flags(enabled=False):
        batch = reconstruct(random_unet, diffusion, x0, start_t=25, seed=7, steps=5)
        alone = reconstruct(random_unet, diffusion, x0[2:], start_t=25, seed=7, steps=5, first_index=2)
        again = reconstruct(random_unet, diffusion, x0, start_t=25, seed=7, steps=5)
    assert torch.equal(batch[2:], alone) and torch.equal(batch, again)
    variations = reconstruct(random_unet, diffusion, x0[0], start_t=25, seed=7, steps=5, num_images=2)
    assert not torch.allclose(variations[0], variations[1])  # own streams: variations, not copies


# ---- interpolation -----------------------------------------------------------------------------------------------
def test_interpolation_mixes_two_independent_encodings_linearly(diffusion: GaussianDiffusion) -> None:
    a, b = images(1, seed=1), images(1, seed=2)
    lam = [0.0, 0.25, 1.0]
    chain = interpolation_chain(diffusion, a, b, lam, t=30, seed=4, steps=5)
    eps_a = ImageNoise.for_images(4, [0], SHAPE).draw()
    eps_b = ImageNoise.for_images(4, [1], SHAPE).draw()
    x_t, x_t_b = encode(diffusion, a, 30, eps_a), encode(diffusion, b, 30, eps_b)
    mixed, t = chain.model_input()
    for row, w in enumerate(lam):
        torch.testing.assert_close(mixed[row], ((1 - w) * x_t + w * x_t_b)[0])
    assert torch.equal(t, torch.full((3,), 29)) and chain.total == 5
    assert not torch.allclose(eps_a, eps_b)  # the official code's two q_sample calls: two noises
    # Every λ decodes with the same noise (the paper fixes it across λ): image 0's stream after x_t's draw.
    stream = ImageNoise.for_images(4, [0], SHAPE)
    stream.draw()
    expected = stream.draw()[0]
    following = chain.noise.draw()
    for row in range(3):
        assert torch.equal(following[row], expected)


@pytest.mark.filterwarnings("ignore:TF32")
def test_lambda_0_and_1_are_the_reconstructions(diffusion: GaussianDiffusion, random_unet: UNet) -> None:
    a, b = images(1, seed=1), images(1, seed=2)
    with torch.backends.mkldnn.flags(enabled=False):
        rows = interpolate(random_unet, diffusion, a, b, [0.0, 0.5, 1.0], t=30, seed=3, steps=6)
        rec_a = reconstruct(random_unet, diffusion, a, start_t=30, seed=3, steps=6)
        # λ = 1: B's encoding x'_t (stream 1's first draw), decoded with λ = 0's noise.
        noise = ImageNoise([image_seed(3, 0)], SHAPE)
        noise.draw()
        x_t_b = encode(diffusion, b, 30, ImageNoise.for_images(3, [1], SHAPE).draw())
        chain = Chain(diffusion, noise, timesteps=reconstruction_chain(diffusion, b, start_t=30, seed=3,
                                                                       steps=6).timesteps, x_T=x_t_b)
        rec_b = list(sample_steps(random_unet, chain))[-1].x_prev.clamp(-1, 1)
        middle = interpolate(random_unet, diffusion, a, b, [0.5], t=30, seed=3, steps=6)
    assert torch.equal(rows[0], rec_a[0]) and torch.equal(rows[2], rec_b[0])
    assert torch.equal(rows[1], middle[0])  # a λ's row does not depend on the other λs
    assert not torch.allclose(rows[1], rows[0]) and not torch.allclose(rows[1], rows[2])


def test_interpolating_with_the_exact_denoiser_of_one_image(diffusion: GaussianDiffusion) -> None:
    c = images(1, seed=3)
    out = interpolate(point_denoiser(diffusion, c), diffusion, c, c, [0.0, 0.3, 1.0], t=20, seed=0, steps=10,
                      clip_denoised=False)
    torch.testing.assert_close(out, c.expand(3, *SHAPE), atol=1e-4, rtol=0)


# ---- refusals ----------------------------------------------------------------------------------------------------
def test_bad_requests_are_refused_with_the_reason(diffusion: GaussianDiffusion) -> None:
    x0 = images(1)
    for bad in (0, 51, -3, 2.5, True):
        with pytest.raises(ValueError, match=r"start_t must be an integer between 1 and 50"):
            reconstruction_chain(diffusion, x0, start_t=bad, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps must be between 1 and 10"):
        reconstruction_chain(diffusion, x0, start_t=10, seed=0, steps=11)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        reconstruction_chain(diffusion, x0 * 2, start_t=10, seed=0)
    with pytest.raises(ValueError, match="one image or one per index"):
        reconstruction_chain(diffusion, images(2), start_t=10, seed=0, indices=range(3))
    for lam in ([], [0.5, 1.5], [-0.1], [float("nan")]):
        with pytest.raises(ValueError, match="lambdas"):
            interpolation_chain(diffusion, x0, x0, lam, t=10, seed=0)
    with pytest.raises(ValueError, match="t must be an integer between 1 and 50"):
        interpolation_chain(diffusion, x0, x0, t=60, seed=0)
    with pytest.raises(ValueError, match="two single images"):
        interpolation_chain(diffusion, images(2), x0, t=10, seed=0)
