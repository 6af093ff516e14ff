"""The reverse chain: step records, early stop, respacing, DDIM, closed-form recovery, per-image reproducibility."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch

from model.config import DiffusionConfig
from model.diffusion import EpsFn, GaussianDiffusion
from model.inference import pad_lone_image
from model.sampler import Chain, ImageNoise, respace, sample, sample_steps, spaced_timesteps
from model.unet import UNet

SHAPE = (3, 8, 8)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """8x8 images: one thread is several times faster than two fighting over shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=50))


def point_denoiser(d: GaussianDiffusion, c: torch.Tensor) -> EpsFn:
    """The exact eps when all data is the single image ``c``: eps = (x_t - sqrt(abar_t) c) / sqrt(1 - abar_t)."""
    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = d._extract
        return (x_t - e(d.sqrt_alphas_cumprod, t, 4) * c) / e(d.sqrt_one_minus_alphas_cumprod, t, 4)
    return eps_fn


def zeros(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


# ---- timesteps and respacing ------------------------------------------------------------------------------------
def test_spaced_timesteps_cover_the_range() -> None:
    assert spaced_timesteps(1000, 1000) == list(range(1000))
    for steps in (1, 2, 10, 37, 999):
        ts = spaced_timesteps(1000, steps)
        assert len(ts) == steps and ts == sorted(ts) and ts[-1] == 999 and (steps == 1 or ts[0] == 0)
    with pytest.raises(ValueError, match="steps"):
        spaced_timesteps(1000, 0)


def test_respacing_keeps_alphabar_at_the_kept_steps(diffusion: GaussianDiffusion) -> None:
    kept = [0, 3, 10, 11, 30, 49]
    r = respace(diffusion, kept)
    assert r.num_timesteps == len(kept)
    torch.testing.assert_close(r.arrays64["alphas_cumprod"], diffusion.arrays64["alphas_cumprod"][kept],
                               rtol=1e-12, atol=0)
    full = respace(diffusion, range(50))
    torch.testing.assert_close(full.arrays64["betas"], diffusion.arrays64["betas"], rtol=1e-12, atol=0)


# ---- the chain as a generator -----------------------------------------------------------------------------------
def test_sample_steps_yields_one_record_per_step_with_x0_hat_when_asked(diffusion: GaussianDiffusion) -> None:
    chain = Chain(diffusion, ImageNoise.for_images(0, range(2), SHAPE), steps=10)
    steps = list(sample_steps(zeros, chain, x0_every=4))
    assert [s.index for s in steps] == list(range(10)) and all(s.total == 10 for s in steps)
    assert [s.t for s in steps] == spaced_timesteps(50, 10)[::-1]
    assert [s.index for s in steps if s.x0_hat is not None] == [0, 4, 8, 9]
    assert steps[-1].is_last and chain.done
    for a, b in itertools.pairwise(steps):
        assert torch.equal(a.x_prev, b.x_t)
    never = list(sample_steps(zeros, Chain(diffusion, ImageNoise.for_images(0, [0], SHAPE), steps=5)))
    assert all(s.x0_hat is None for s in never)


def test_stopping_early_runs_no_more_network_calls(diffusion: GaussianDiffusion) -> None:
    calls = []

    def counting(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    chain = Chain(diffusion, ImageNoise.for_images(0, [0], SHAPE), steps=20)
    for step in sample_steps(counting, chain):
        if step.index == 4:
            break
    assert len(calls) == 5 and chain.index == 5 and not chain.done


def test_stepping_leaves_the_callers_autograd_mode_alone(diffusion: GaussianDiffusion) -> None:
    gen = sample_steps(zeros, Chain(diffusion, ImageNoise.for_images(0, [0], SHAPE), steps=5))
    next(gen)  # a caller that previews one step and keeps the generator around
    assert not torch.is_inference_mode_enabled()
    w = torch.ones(2, requires_grad=True)
    (w * 2).sum().backward()  # training code in between still works
    assert w.grad is not None


def test_bad_sampler_options_are_refused(diffusion: GaussianDiffusion) -> None:
    noise = ImageNoise.for_images(0, [0], SHAPE)
    with pytest.raises(ValueError, match="sampler"):
        Chain(diffusion, noise, sampler="euler")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eta"):
        Chain(diffusion, noise, sampler="ddim", eta=1.5)
    with pytest.raises(ValueError, match="steps"):
        Chain(diffusion, noise, steps=51)
    chain = Chain(diffusion, noise, steps=1)
    chain.step(torch.zeros(1, *SHAPE))
    with pytest.raises(RuntimeError, match="finished"):
        chain.step(torch.zeros(1, *SHAPE))


# ---- samplers against closed forms ------------------------------------------------------------------------------
@pytest.mark.parametrize(("sampler", "steps", "variance"), [("ddim", 10, None), ("ddim", 50, None),
                                                            ("ddpm", 50, "fixedlarge"), ("ddpm", 7, "fixedsmall"),
                                                            ("ddpm", 1, "fixedlarge")])
def test_exact_denoiser_recovers_the_single_data_point(diffusion: GaussianDiffusion, sampler: str, steps: int,
                                                       variance: str | None) -> None:
    c = torch.rand(1, *SHAPE) * 1.6 - 0.8
    out = sample(point_denoiser(diffusion, c), diffusion, 3, SHAPE, seed=1, steps=steps, sampler=sampler,
                 variance=variance, clip_denoised=False)
    torch.testing.assert_close(out, c.expand(3, *SHAPE), atol=1e-4, rtol=0)


def test_ddim_with_eta_0_is_deterministic_given_x_T(diffusion: GaussianDiffusion, random_unet: UNet) -> None:
    x_T = torch.randn(2, *SHAPE)
    outs = []
    for seed in (0, 1):  # different noise streams: DDIM(eta=0) never draws from them after x_T
        chain = Chain(diffusion, ImageNoise.for_images(seed, range(2), SHAPE), steps=8, sampler="ddim", x_T=x_T)
        outs.append(list(sample_steps(random_unet, chain))[-1].x_prev)
    assert torch.equal(outs[0], outs[1])
    stochastic = Chain(diffusion, ImageNoise.for_images(1, range(2), SHAPE), steps=8, sampler="ddim", eta=1.0,
                       x_T=x_T)
    assert not torch.allclose(list(sample_steps(random_unet, stochastic))[-1].x_prev, outs[0])


# ---- reproducibility --------------------------------------------------------------------------------------------
def _images(unet: UNet, d: GaussianDiffusion, indices: list[int], sampler: str = "ddpm") -> torch.Tensor:
    chain = Chain(d, ImageNoise.for_images(7, indices, SHAPE), steps=10, sampler=sampler,  # type: ignore[arg-type]
                  eta=0.5 if sampler == "ddim" else 0.0)
    return list(sample_steps(unet, chain))[-1].x_prev


@pytest.mark.filterwarnings("ignore:TF32")
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_image_i_is_bit_identical_whatever_the_batch_without_onednn(diffusion: GaussianDiffusion,
                                                                    random_unet: UNet, sampler: str) -> None:
    # oneDNN picks convolution kernels by batch size (last-bit differences); PyTorch's native convolution
    # computes each image alone, so with it off, image 2 of seed 7 is the same bits in every batch.
    with torch.backends.mkldnn.flags(enabled=False):
        batch = _images(random_unet, diffusion, [0, 1, 2, 3], sampler)
        alone = _images(random_unet, diffusion, [2], sampler)
        mixed = _images(random_unet, diffusion, [5, 2, 9], sampler)
    assert torch.equal(batch[2], alone[0]) and torch.equal(batch[2], mixed[1])
    assert not torch.allclose(batch[0], batch[2])


def test_image_i_is_the_same_image_whatever_the_batch_by_default(diffusion: GaussianDiffusion,
                                                                 random_unet: UNet) -> None:
    batch = _images(random_unet, diffusion, [0, 1, 2, 3])
    alone = _images(random_unet, diffusion, [2])
    torch.testing.assert_close(batch[2], alone[0], atol=1e-5, rtol=0)  # oneDNN: equal up to float rounding
    again = _images(random_unet, diffusion, [0, 1, 2, 3])
    assert torch.equal(batch, again)  # same request, same batch: same bits


@pytest.mark.filterwarnings("ignore:TF32")
def test_sample_returns_images_in_range_for_the_requested_indices(diffusion: GaussianDiffusion,
                                                                  random_unet: UNet) -> None:
    with torch.backends.mkldnn.flags(enabled=False):
        whole = sample(random_unet, diffusion, 4, SHAPE, seed=3, steps=5)
        tail = sample(random_unet, diffusion, 2, SHAPE, seed=3, steps=5, first_index=2)
    assert whole.shape == (4, *SHAPE) and whole.abs().max() <= 1.0
    assert torch.equal(whole[2:], tail)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_keeps_image_i_bit_identical_alone_with_a_padded_lone_image(diffusion: GaussianDiffusion,
                                                                           random_unet: UNet, sampler: str) -> None:
    # oneDNN on (the default): rows agree for every batch of 2+, and a lone image is run as two rows.
    eps_fn = pad_lone_image(random_unet)
    options = {"steps": 10, "sampler": sampler, "eta": 0.5 if sampler == "ddim" else 0.0}
    whole = sample(eps_fn, diffusion, 4, SHAPE, seed=3, **options)
    alone = sample(eps_fn, diffusion, 1, SHAPE, seed=3, first_index=2, **options)
    pair = sample(eps_fn, diffusion, 2, SHAPE, seed=3, first_index=1, **options)
    assert torch.equal(whole[2], alone[0]) and torch.equal(whole[1:3], pair)
