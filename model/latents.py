"""Reconstruction, variation and interpolation: encode images with q at a timestep, decode with the reverse chain.

Paper, Sections 4.3-4.4. ``start_t`` and ``t`` here are the *paper's* timesteps, 1..T (index ``t - 1`` of
``model.diffusion``): x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) (Eq. 4), then the reverse chain
(``model.sampler.Chain``, any sampler, respaced or not) runs from t down to 0 over ``steps`` timesteps spread
evenly over 1..t (default: all t of them). Small t gives the image back; at t = T only sqrt(abar_T) ~ 0.006 of
the image is left in x_T, so the result is, to that precision, an unconditional sample.

- **Reconstruction / variation** (Fig. 7): ``reconstruction_chain``. Image ``i`` of request ``seed`` draws its
  q-noise and then every step's noise from its own stream (``model.sampler.ImageNoise``, seeded from
  ``(seed, i)``), so results do not depend on the batch. Variations of one image (the same x0 for every row)
  share its coarse features. With ``shared_latent`` every row starts from the *same* x_t, drawn from a stream
  of its own (index -1 of the request, no image's), and only the reverse noise differs: the paper's Fig. 7,
  "samples from p(x0 | x_t)" for one x_t.
- **Interpolation** (Fig. 8, 9): ``interpolation_chain`` encodes two images at t and decodes
  x̄_t = (1 - λ) x_t + λ x'_t for each λ. The noise follows the official code (hojonathanho/diffusion,
  ``diffusion_tf/diffusion_utils.py``, ``GaussianDiffusion.interpolate``): ``xt1 = self.q_sample(x1, t=...)`` and
  ``xt2 = self.q_sample(x2, t=...)`` each draw their *own* Gaussian noise (two independent encodings; the code
  carries a "TODO: use the same noise for both endpoints?"), mixed linearly (the constant-variance mix is
  commented out there). As the paper says (Sec. 4.4, "we fixed the noise for different values of λ so x_t and
  x'_t remain the same"), the encodings and the reverse chain's noise are the same for every λ: x_t's noise
  is the first draw of image 0's stream, x'_t's the first draw of image 1's, and every λ's chain continues a
  copy of image 0's stream. So λ = 0 is exactly ``reconstruction_chain`` of A as image 0, and λ = 1 is the
  reverse chain from B's encoding x'_t with that same noise.

The plain loops ``reconstruct`` and ``interpolate`` run these chains to the end; a batching engine drives the
chains itself (``model_input`` / ``step``). This module knows the diffusion and the sampler, nothing of files or
services.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from model.diffusion import EpsFn, GaussianDiffusion
from model.sampler import Chain, ImageNoise, image_seed, sample_steps, spaced_timesteps

__all__ = [
    "DEFAULT_LAMBDAS",
    "LATENT_STREAM",
    "check_images",
    "check_timestep",
    "encode",
    "interpolate",
    "interpolation_chain",
    "reconstruct",
    "reconstruction_chain",
]

DEFAULT_LAMBDAS: tuple[float, ...] = tuple(i / 10 for i in range(11))
LATENT_STREAM = -1  # the stream index of the shared x_t's noise (no image has a negative index)


def check_timestep(diffusion: GaussianDiffusion, t: int, name: str = "start_t") -> int:
    """``t`` as an int in 1..T, else ``ValueError`` naming ``name`` and the range."""
    T = diffusion.num_timesteps
    if isinstance(t, bool) or int(t) != t or not 1 <= int(t) <= T:
        raise ValueError(f"{name} must be an integer between 1 and {T} (the model's T), got {t!r}")
    return int(t)


def check_images(x0: torch.Tensor, name: str = "x0") -> torch.Tensor:
    """``x0`` as a float (B, C, H, W) batch in [-1, 1] (a single (C, H, W) image becomes a batch of one)."""
    if x0.dim() == 3:
        x0 = x0[None]
    if x0.dim() != 4 or not x0.is_floating_point():
        raise ValueError(f"{name} must be a float tensor (B, C, H, W) or (C, H, W), got {tuple(x0.shape)} "
                         f"{x0.dtype}")
    if x0.numel() and (x0.min() < -1.0 or x0.max() > 1.0 or not bool(torch.isfinite(x0).all())):
        raise ValueError(f"{name} must lie in [-1, 1] (uint8 images scaled as x / 127.5 - 1)")
    return x0


def encode(diffusion: GaussianDiffusion, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, a draw of q(x_t | x0) (Eq. 4) at the paper's timestep t."""
    index = torch.full((x0.shape[0],), t - 1, dtype=torch.long, device=x0.device)
    return diffusion.q_sample(x0, index, noise)


def reconstruction_chain(
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    *,
    start_t: int,
    seed: int,
    indices: Sequence[int] | None = None,
    steps: int | None = None,
    shared_latent: bool = False,
    **chain_kwargs: Any,
) -> Chain:
    """The reverse chain from x_t ~ q(x_t | x0) at ``start_t`` (1..T) down to 0: images ``indices`` of ``seed``.

    Args:
        x0: (B, C, H, W) in [-1, 1], one row per image; or one image (C, H, W) / (1, C, H, W) shared by every
            image in ``indices`` (variations of it).
        indices: the images' indices in the request (default ``0..B-1``): image i's noise stream is (seed, i).
        steps: reverse steps spread evenly over timesteps 1..start_t (default ``start_t``: every one).
        shared_latent: every row decodes the same x_t (Fig. 7), encoded with the request's latent stream.
        chain_kwargs: ``sampler``, ``eta``, ``variance``, ``clip_denoised`` as for ``Chain``.
    """
    start_t = check_timestep(diffusion, start_t)
    x0 = check_images(x0).to(diffusion.device)
    indices = list(range(x0.shape[0])) if indices is None else list(indices)
    if not indices:
        raise ValueError("at least one image index is needed")
    if x0.shape[0] not in (1, len(indices)):
        raise ValueError(f"x0 has {x0.shape[0]} images for {len(indices)} indices: give one image or one per index")
    x0 = x0.expand(len(indices), *x0.shape[1:])
    timesteps = spaced_timesteps(start_t, steps if steps is not None else start_t)
    noise = ImageNoise.for_images(seed, indices, x0.shape[1:], diffusion.device)
    if shared_latent:
        latent = ImageNoise.for_images(seed, [LATENT_STREAM], x0.shape[1:], diffusion.device).draw()
        x_t = encode(diffusion, x0, start_t, latent.expand_as(x0))
    else:
        x_t = encode(diffusion, x0, start_t, noise.draw())
    return Chain(diffusion, noise, timesteps=timesteps, x_T=x_t, **chain_kwargs)


def interpolation_chain(
    diffusion: GaussianDiffusion,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    *,
    t: int | None = None,
    seed: int,
    steps: int | None = None,
    **chain_kwargs: Any,
) -> Chain:
    """One reverse chain per λ from x̄_t = (1 - λ) x_t + λ x'_t, the encodings of ``x_a`` and ``x_b`` at ``t``.

    ``x_a``, ``x_b``: one image each, (C, H, W) or (1, C, H, W) in [-1, 1]. ``t``: 1..T (default T // 2, the
    paper's 500 of 1000). ``lambdas`` in [0, 1], in the order of the output rows. The noise: see the module
    docstring (independent encodings as the official code; the same noise for every λ as the paper).
    """
    T = diffusion.num_timesteps
    t = check_timestep(diffusion, T // 2 if t is None else t, "t")
    x_a, x_b = check_images(x_a, "x_a").to(diffusion.device), check_images(x_b, "x_b").to(diffusion.device)
    if x_a.shape[0] != 1 or x_b.shape[0] != 1 or x_a.shape != x_b.shape:
        raise ValueError(f"interpolation needs two single images of one shape, got {tuple(x_a.shape)} and "
                         f"{tuple(x_b.shape)}")
    lam = [float(v) for v in lambdas]
    if not lam or any(not 0.0 <= v <= 1.0 for v in lam):
        raise ValueError(f"lambdas must be a non-empty list of numbers in [0, 1], got {list(lambdas)!r}")
    shape, dev = x_a.shape[1:], diffusion.device
    # Every row continues its own copy of image 0's stream; its first draw is x_t's noise (rows agree on it).
    noise = ImageNoise([image_seed(seed, 0)] * len(lam), shape, dev)
    x_t = encode(diffusion, x_a, t, noise.draw()[:1])
    x_t_b = encode(diffusion, x_b, t, ImageNoise.for_images(seed, [1], shape, dev).draw())
    w = torch.tensor(lam, dtype=x_t.dtype, device=dev).reshape(-1, 1, 1, 1)
    mixed = (1.0 - w) * x_t + w * x_t_b
    timesteps = spaced_timesteps(t, steps if steps is not None else t)
    return Chain(diffusion, noise, timesteps=timesteps, x_T=mixed, **chain_kwargs)


def _run(eps_fn: EpsFn, chain: Chain) -> torch.Tensor:
    for step in sample_steps(eps_fn, chain):
        last = step.x_prev
    return last.clamp(-1.0, 1.0)


def reconstruct(eps_fn: EpsFn, diffusion: GaussianDiffusion, x0: torch.Tensor, *, start_t: int, seed: int = 0,
                num_images: int | None = None, first_index: int = 0, steps: int | None = None,
                shared_latent: bool = False, **chain_kwargs: Any) -> torch.Tensor:
    """Reconstructions (N, C, H, W) in [-1, 1] of ``x0`` from ``start_t``: images ``first_index..`` of ``seed``.

    ``x0`` one row per image, or one image and ``num_images`` variations of it (default: as many as rows).
    """
    x0 = check_images(x0)
    n = num_images if num_images is not None else x0.shape[0]
    chain = reconstruction_chain(diffusion, x0, start_t=start_t, seed=seed,
                                 indices=range(first_index, first_index + n), steps=steps,
                                 shared_latent=shared_latent, **chain_kwargs)
    return _run(eps_fn, chain)


def interpolate(eps_fn: EpsFn, diffusion: GaussianDiffusion, x_a: torch.Tensor, x_b: torch.Tensor,
                lambdas: Sequence[float] = DEFAULT_LAMBDAS, *, t: int | None = None, seed: int = 0,
                steps: int | None = None, **chain_kwargs: Any) -> torch.Tensor:
    """The interpolants (len(lambdas), C, H, W) in [-1, 1] between ``x_a`` (λ = 0) and ``x_b`` (λ = 1) at ``t``."""
    return _run(eps_fn, interpolation_chain(diffusion, x_a, x_b, lambdas, t=t, seed=seed, steps=steps,
                                            **chain_kwargs))
