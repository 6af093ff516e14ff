"""The variational bound of given images, term by term, and the rate-distortion curve of progressive coding.

Paper, Sec. 4.3, Eq. 5, Fig. 5, Algorithms 3-4. Notation as ``model.diffusion``: index ``i`` in 0..T-1 is
the paper's timestep ``t = i + 1``; ``terms[:, s]`` is L_s (s >= 1: KL(q(x_s | x_{s+1}, x0) || p(x_s | x_{s+1}))
at index s; s = 0: the discretised decoder -log p(x0 | x1)), ``prior`` is L_T, all in bits/dim (nats / (D ln 2)).

``BoundChain`` computes the full bound of a batch x0 one term per step, from index T-1 down to 0, so a batching
engine can run it in the same U-Net forwards as sampling chains (``model_input()`` / ``step(eps)``, the
``model.sampler.StepDriven`` seam; T steps, one network call each). At each step x_t is a fresh draw of
q(x_t | x0) (Eq. 4) from the image's own noise stream (``ImageNoise``, seeded from (seed, image index)), as the
official ``calc_bpd_loop`` draws a fresh q_sample per term, so an image's numbers do not depend on its batch.
p's mean uses the clipped x0-hat (the diffusion's ``clip_denoised``, True for the paper's models: the official
evaluation's choice, see ``model.diffusion``).

Progressive coding as rate accounting (Algorithms 3-4): a sender transmits x_T, then x_{T-1}, ..., x_1 (each
costs its KL term L_t in bits under p), then x0 (L_0). A receiver holding x_t has received
``rate(t) = L_T + L_{T-1} + ... + L_t`` bits/dim and can show x0-hat(x_t) (Eq. 15), so at paper time t:

- ``rate[:, t-1] = prior + terms[:, t:].sum()`` (t = T: L_T alone; t = 1: L_T + ... + L_1, the paper's "rate");
- ``distortion[:, t-1] = 127.5 * sqrt(mean((x0 - x0-hat(x_t))^2))``, the RMSE on the [0, 255] scale.

x0-hat is the clipped prediction the bound's step used, and x_t a draw of q(x_t | x0) (the marginal of the
sender's x_t), as the official ``calc_bpd_loop`` records them (``mse`` of ``pred_xstart`` at each term's x_t,
``diffusion_utils_2.py``). The pairing of rate and distortion follows Sec. 4.3 ("the rate is calculated as the
cumulative number of bits received so far at time t") and the paper's t = 1 figures (rate L_1 + ... + L_T =
1.78 bits/dim, RMSE 0.95 for CIFAR10, Sec. 4.3). A data set's curve averages the rates over images and pools the
squared errors (the RMSE over every pixel of every image): ``curve``.

This module knows the diffusion and the sampler's noise streams; it does not know files, plots or services.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from model.config import VarianceType
from model.diffusion import EpsFn, GaussianDiffusion
from model.latents import check_images
from model.sampler import ImageNoise, StepCount, sample_steps, spaced_timesteps

__all__ = [
    "BoundChain",
    "BoundStep",
    "Likelihood",
    "RDPoint",
    "check_on_grid",
    "curve",
    "likelihood",
    "rd_grid",
]

PIXEL_SCALE = 127.5  # [-1, 1] -> [0, 255]


def check_on_grid(x0: torch.Tensor) -> torch.Tensor:
    """``x0`` as a (B, C, H, W) batch in [-1, 1] on the 8-bit grid (``uint8 / 127.5 - 1``), else ``ValueError``.

    The discretised decoder gives each of the 256 levels a bin: off-grid values would be scored wrongly.
    """
    x0 = check_images(x0)
    levels = (x0.double() + 1.0) * PIXEL_SCALE
    if x0.numel() and (levels - levels.round()).abs().max() > 1e-3:
        raise ValueError("x0 must lie on the 8-bit grid (uint8 images scaled as x / 127.5 - 1) for the bound")
    return x0


@dataclass
class BoundStep:
    """One term of the bound for every image of a ``BoundChain``.

    ``index``: 0-based step (0 is index T-1, the noisiest); ``t``: the index the network saw (paper time t + 1);
    ``term``: (B,) L_t in bits/dim (the decoder L_0 at t = 0); ``mse``: (B,) mean squared error of x0-hat
    against x0 in [-1, 1] units; ``x_t``: the q-sample the term used; ``x0_hat``: the (clipped) x0 prediction
    from it when asked for, else ``None`` (a preview frame: what a receiver of the progressive code sees).
    """

    index: int
    total: int
    t: int
    term: torch.Tensor
    mse: torch.Tensor
    x_t: torch.Tensor
    x0_hat: torch.Tensor | None

    @property
    def is_last(self) -> bool:
        return self.index == self.total - 1


@dataclass(frozen=True)
class RDPoint:
    """One point of a rate-distortion curve: at paper time ``t``, ``rate`` bits/dim and ``distortion`` RMSE."""

    t: int
    rate: float
    distortion: float


@dataclass
class Likelihood:
    """The bound of a batch, every term, in bits/dim, and the x0-hat errors: see the module docstring.

    ``prior`` (B,) = L_T; ``terms`` (B, T), ``terms[:, s]`` = L_s; ``mse`` (B, T), ``mse[:, i]`` = mean squared
    error (in [-1, 1] units) of x0-hat(x_{i+1}) against x0.
    """

    prior: torch.Tensor
    terms: torch.Tensor
    mse: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        return self.terms.shape[1]

    @property
    def bits_per_dim(self) -> torch.Tensor:
        """(B,) the whole bound L_T + L_{T-1} + ... + L_0: the lossless code length of each image."""
        return self.prior + self.terms.sum(dim=1)

    def rate(self) -> torch.Tensor:
        """(B, T): ``rate[:, t-1]`` = L_T + ... + L_t, the bits/dim received once x_t is (paper time t)."""
        # suffix sums: sent[:, i] = terms[:, i:].sum(); rate at paper t = prior + sent[:, t]
        sent = self.terms.flip(1).cumsum(1).flip(1)
        after = torch.cat([sent[:, 1:], torch.zeros_like(sent[:, :1])], dim=1)
        return self.prior[:, None] + after

    def distortion(self) -> torch.Tensor:
        """(B, T): ``distortion[:, t-1]`` = RMSE(x0, x0-hat(x_t)) on the [0, 255] scale (paper time t)."""
        return PIXEL_SCALE * self.mse.sqrt()

    def select(self, rows: slice | Sequence[int]) -> Likelihood:
        return Likelihood(self.prior[rows], self.terms[rows], self.mse[rows])

    @staticmethod
    def cat(parts: Iterable[Likelihood]) -> Likelihood:
        parts = list(parts)
        return Likelihood(torch.cat([p.prior for p in parts]), torch.cat([p.terms for p in parts]),
                          torch.cat([p.mse for p in parts]))

    def to(self, device: torch.device | str) -> Likelihood:
        return Likelihood(self.prior.to(device), self.terms.to(device), self.mse.to(device))


def rd_grid(num_timesteps: int, points: int | None = None) -> list[int]:
    """Paper times t (1..T, ascending) for a curve: every one, or ``points`` spread evenly (1 and T included)."""
    return [i + 1 for i in spaced_timesteps(num_timesteps, points or num_timesteps)]


def curve(result: Likelihood, ts: Sequence[int] | None = None) -> list[RDPoint]:
    """The data set's curve over all images of ``result``: mean rate, pooled RMSE, at paper times ``ts``."""
    T = result.num_timesteps
    ts = rd_grid(T) if ts is None else list(ts)
    if any(not 1 <= t <= T for t in ts):
        raise ValueError(f"curve times must lie in 1..{T}")
    rate = result.rate().double().mean(dim=0)
    mse = result.mse.double().mean(dim=0)
    return [RDPoint(t, float(rate[t - 1]), float(PIXEL_SCALE * math.sqrt(float(mse[t - 1])))) for t in ts]


class BoundChain(StepCount):
    """The full bound of images ``x0`` one term per step (T steps, index T-1 down to 0), driven from outside.

    Args:
        diffusion: the model's process (T timesteps; the bound needs every one, so no respacing).
        x0: (B, C, H, W) on the 8-bit grid in [-1, 1].
        seed, indices: image i's q-noise comes from stream (seed, indices[i]) (default indices 0..B-1).
        variance, clip_denoised: p's variance and x0-hat clipping; the diffusion's defaults when None.
    """

    def __init__(self, diffusion: GaussianDiffusion, x0: torch.Tensor, *, seed: int,
                 indices: Sequence[int] | None = None, variance: VarianceType | None = None,
                 clip_denoised: bool | None = None) -> None:
        x0 = check_on_grid(x0).to(diffusion.device)
        b, T = x0.shape[0], diffusion.num_timesteps
        indices = list(range(b)) if indices is None else list(indices)
        if len(indices) != b:
            raise ValueError(f"x0 has {b} images for {len(indices)} indices")
        diffusion.variance_of(variance)  # an unknown name is refused here, not at the first step
        self.diffusion, self.x0 = diffusion, x0
        self.variance, self.clip = variance, clip_denoised
        self.noise = ImageNoise.for_images(seed, indices, x0.shape[1:], diffusion.device)
        self.timesteps = list(range(T - 1, -1, -1))
        self._t = torch.arange(T - 1, -1, -1, dtype=torch.long, device=diffusion.device)
        self.prior = diffusion.prior_bpd(x0)
        self.terms = torch.zeros(b, T, device=diffusion.device)
        self.mse = torch.zeros(b, T, device=diffusion.device)
        self.index = 0
        self.x = self._q_sample()

    def _q_sample(self) -> torch.Tensor:
        return self.diffusion.q_sample(self.x0, self._t[self.index].expand(self.x0.shape[0]), self.noise.draw())

    def model_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, t)`` for the network at the current step: x_t ~ q(x_t | x0), t int64 (B,)."""
        return self.x, self._t[self.index].expand(self.batch_size)

    def step(self, eps: torch.Tensor, *, want_x0: bool = False) -> BoundStep:
        """Record this step's term and x0-hat error from the network's ``eps``; draw the next x_t."""
        if self.done:
            raise RuntimeError("the bound has already been computed")
        x_t, t = self.model_input()
        i = self.timesteps[self.index]
        d = self.diffusion
        p = d.p_mean_variance_from_eps(x_t, t, eps, variance=self.variance, clip_denoised=self.clip)
        term = d.kl_term_bpd(self.x0, x_t, t, p) if i > 0 else d.decoder_nll_bpd(self.x0, p)  # all rows share t
        x0_hat = p.x0_hat
        mse = ((x0_hat - self.x0) ** 2).mean(dim=(1, 2, 3))
        self.terms[:, i], self.mse[:, i] = term, mse
        out = BoundStep(self.index, self.total, i, term, mse, x_t, x0_hat if want_x0 else None)
        self.index += 1
        if not self.done:
            self.x = self._q_sample()
        return out

    def result(self) -> Likelihood:
        """The finished bound (copies); ``RuntimeError`` before the last step."""
        if not self.done:
            raise RuntimeError(f"the bound is not finished: {self.index} of {self.total} terms")
        return Likelihood(self.prior.clone(), self.terms.clone(), self.mse.clone())


def likelihood(eps_fn: EpsFn, diffusion: GaussianDiffusion, x0: torch.Tensor, *, seed: int = 0,
               first_index: int = 0, variance: VarianceType | None = None, clip_denoised: bool | None = None
               ) -> Likelihood:
    """The full bound of ``x0`` (images ``first_index..`` of ``seed``): T network calls on the whole batch."""
    chain = BoundChain(diffusion, x0, seed=seed, indices=range(first_index, first_index + len(check_images(x0))),
                       variance=variance, clip_denoised=clip_denoised)
    for _ in sample_steps(eps_fn, chain):
        pass
    return chain.result()
