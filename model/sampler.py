"""The reverse chain: ancestral DDPM sampling (Algorithm 2), respaced schedules, DDIM, per-image noise streams.

A ``Chain`` holds the state of one batch of images walking down a list of timesteps. It is driven from outside:
``model_input()`` gives ``(x_t, t)`` for the network, ``step(eps)`` applies one update and returns a ``Step``
record. ``sample_steps`` is the plain loop (one network call per step) as a generator: callers preview, cancel
or stop early simply by what they do with each record. A worker that batches several chains into one forward
pass drives ``model_input``/``step`` itself (the ``StepDriven`` protocol: ``model.bound.BoundChain`` has the
same seam, and ``model.latents`` builds Chains that start from an encoded x_t). No I/O, no progress bars, no
sleeping here.

Reproducibility: every image has its own ``torch.Generator`` seeded from ``(seed, image index)`` and draws its
x_T and every step's noise from that stream alone, so image ``i`` of seed ``s`` is the same image whatever the
batch. Bit for bit only as far as the network's rows do not depend on the batch: on the CPU, oneDNN's
convolutions agree row for row across every batch of 2 or more but pick another kernel for a batch of exactly 1
(last-bit differences); ``model.inference.pad_lone_image(eps_fn)`` runs a lone image as two rows and closes that
gap (the service's engine does). On CUDA, cuDNN promises no bit-exactness across batch sizes at all.

Fewer steps (improved-diffusion's respacing): keep a subset S of the T timesteps; the new process has
``beta'_k = 1 - abar[S_k] / abar[S_{k-1}]``, so its alphabar values are exactly the kept ones, and the network
is still called with the original timestep ``S_k``. DDIM (Song et al. 2021) uses the same kept alphabars.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch

from model.config import SAMPLERS, VARIANCE_TYPES, SamplerName, VarianceType
from model.diffusion import EpsFn, GaussianDiffusion
from model.progressive import is_preview_step

__all__ = [
    "SAMPLERS",
    "Chain",
    "ImageNoise",
    "SamplerName",
    "Step",
    "StepDriven",
    "StepRecord",
    "image_seed",
    "respace",
    "sample",
    "sample_steps",
    "spaced_timesteps",
]



def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index``'s noise stream for a request seed: a hash, so streams don't overlap."""
    digest = hashlib.blake2b(f"ddpm:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class ImageNoise:
    """Independent Gaussian noise streams, one per image, each a ``torch.Generator`` on ``device``.

    ``draw()`` returns (B, *shape): row ``i`` is the next draw of image ``i``'s stream only.
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.shape = tuple(shape)
        self.dtype = dtype
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    @classmethod
    def for_images(cls, seed: int, indices: Sequence[int], shape: Sequence[int],
                   device: torch.device | str = "cpu") -> ImageNoise:
        """Streams for images ``indices`` of a request with ``seed``."""
        return cls([image_seed(seed, i) for i in indices], shape, device)

    def __len__(self) -> int:
        return len(self.generators)

    def draw(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g, device=self.device, dtype=self.dtype)
                            for g in self.generators])


def spaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly spread over 0..T-1, always including 0 and T-1, ascending."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and {num_timesteps}, got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    kept = sorted({round(i * (num_timesteps - 1) / (steps - 1)) for i in range(steps)})
    assert len(kept) == steps
    return kept


def respace(diffusion: GaussianDiffusion, timesteps: Sequence[int]) -> GaussianDiffusion:
    """A process on the kept ``timesteps`` (ascending subset of 0..T-1) with ``beta'_k = 1 - abar_k/abar_{k-1}``.

    Its ``alphas_cumprod`` equal the original at the kept timesteps; call the network with the original ones.
    """
    ts = sorted(set(int(t) for t in timesteps))
    if not ts or ts[0] < 0 or ts[-1] >= diffusion.num_timesteps:
        raise ValueError(f"timesteps must lie in 0..{diffusion.num_timesteps - 1}")
    abar = diffusion.arrays64["alphas_cumprod"][ts]
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return GaussianDiffusion(1.0 - abar / prev, variance=diffusion.variance,
                             clip_denoised=diffusion.clip_denoised, device=diffusion.device)


@dataclass
class Step:
    """One step of the reverse chain.

    ``index``: 0-based step number (0 is the first, noisiest step); ``t``: the original timestep the network saw;
    ``x_t``: the chain's state entering the step (B,C,H,W); ``x_prev``: its state after the step (the final
    images after the last step, in [-1, 1] up to the clip); ``x0_hat``: the x0 prediction at this step
    (Eq. 15, clipped when clipping is on) when asked for, else ``None``.
    """

    index: int
    total: int
    t: int
    x_t: torch.Tensor
    x_prev: torch.Tensor
    x0_hat: torch.Tensor | None

    @property
    def is_last(self) -> bool:
        return self.index == self.total - 1


class StepRecord(Protocol):
    """What every step-driven object's ``step`` returns: its position, the timestep and the optional x0-hat."""

    index: int
    total: int
    t: int
    x0_hat: torch.Tensor | None

    @property
    def is_last(self) -> bool: ...


R_co = TypeVar("R_co", bound=StepRecord, covariant=True)


class StepDriven(Protocol, Generic[R_co]):
    """The seam a batching engine drives: one network call on ``model_input()``, then ``step(eps)``.

    ``Chain`` (sampling, reconstruction, interpolation) and ``model.bound.BoundChain`` (the variational
    bound) both have it, so their ``(x_t, t)`` can share one forward pass: rows are independent.
    """

    @property
    def total(self) -> int: ...

    @property
    def done(self) -> bool: ...

    @property
    def batch_size(self) -> int: ...

    index: int

    def model_input(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def step(self, eps: torch.Tensor, *, want_x0: bool = False) -> R_co: ...


class StepCount:
    """What every step-driven chain counts (``StepDriven``'s ``total``, ``done`` and ``batch_size``): the chain's
    ``timesteps`` in the order it runs them, ``index`` the steps taken, ``x`` the rows of its current state."""

    timesteps: list[int]
    index: int
    x: torch.Tensor

    @property
    def total(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.index >= self.total

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]


class Chain(StepCount):
    """The reverse chain for one batch of images over ``timesteps`` (descending when run).

    Args:
        diffusion: the model's full process (T timesteps).
        noise: per-image noise streams; x_T is its first draw.
        steps: number of steps (<= T); fewer than T respaces the schedule evenly. Or pass ``timesteps``.
        sampler: ``ddpm`` (ancestral, Algorithm 2 / the official posterior-mean form) or ``ddim``.
        eta: DDIM's noise scale (0 = deterministic; 1 = DDPM-like). Ignored for ``ddpm``.
        variance: ``fixedlarge`` or ``fixedsmall`` for ``ddpm``; the diffusion's default when None.
        clip_denoised: clip x0-hat to [-1, 1] in each update; the diffusion's default when None.
        x_T: the state at the first (highest) kept timestep; default: the first draw of ``noise``. A chain over
            a prefix of the timesteps started from an encoded ``x_t`` is a reconstruction (``model.latents``).
    """

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        noise: ImageNoise,
        *,
        steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        sampler: SamplerName = "ddpm",
        eta: float = 0.0,
        variance: VarianceType | None = None,
        clip_denoised: bool | None = None,
        x_T: torch.Tensor | None = None,
    ) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if variance is not None and variance not in VARIANCE_TYPES:
            raise ValueError(f"variance must be one of {VARIANCE_TYPES}, got {variance!r}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be between 0 and 1, got {eta}")
        T = diffusion.num_timesteps
        if timesteps is None:
            timesteps = spaced_timesteps(T, steps if steps is not None else T)
        kept = sorted(set(int(t) for t in timesteps))
        self.timesteps = kept[::-1]  # descending: the order the chain runs
        self.sampler: SamplerName = sampler
        self.eta = float(eta)
        self.clip = diffusion.clip_denoised if clip_denoised is None else clip_denoised
        self.process = diffusion if kept == list(range(T)) else respace(diffusion, kept)
        self.variance: VarianceType = variance or diffusion.variance
        self.noise = noise
        dev = diffusion.device
        # Model timesteps per step, on the device, so the loop does no host->device copies.
        self._t_model = torch.tensor(self.timesteps, dtype=torch.long, device=dev)
        self._k = torch.arange(len(kept) - 1, -1, -1, dtype=torch.long, device=dev)  # respaced indices
        self.x = noise.draw() if x_T is None else x_T.to(dev)
        self.index = 0

    def model_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, t)`` for the network at the current step: t is the original timestep, int64 (B,)."""
        return self.x, self._t_model[self.index].expand(self.batch_size)

    def step(self, eps: torch.Tensor, *, want_x0: bool = False) -> Step:
        """Apply one update with the network's ``eps`` for ``model_input()``; advance the chain."""
        if self.done:
            raise RuntimeError("the chain has already finished")
        x_t, b = self.x, self.batch_size
        k = self._k[self.index].expand(b)  # index into the (respaced) process
        if self.sampler == "ddpm":
            noise = self.noise.draw() if self.index < self.total - 1 else torch.zeros_like(x_t)
            x_prev, x0_hat = self.process.p_sample_from_eps(
                x_t, k, eps, noise, variance=self.variance, clip_denoised=self.clip)
        else:
            x_prev, x0_hat = self._ddim_update(x_t, k, eps)
        out = Step(self.index, self.total, self.timesteps[self.index], x_t, x_prev,
                   x0_hat if want_x0 else None)
        self.x = x_prev
        self.index += 1
        return out

    def _ddim_update(self, x_t: torch.Tensor, k: torch.Tensor, eps: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM (Song et al. 2021, Eq. 12) on the kept alphabars.

        1. x0-hat from eps (Eq. 15 of DDPM), clipped if asked, and eps re-derived from the clipped x0-hat.
        2. sigma = eta * sqrt((1 - abar_prev)/(1 - abar) * (1 - abar/abar_prev)).
        3. x_prev = sqrt(abar_prev) x0-hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z.
        """
        p, n = self.process, x_t.dim()
        x0_hat = p.predict_x0_from_eps(x_t, k, eps)
        if self.clip:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
            eps = p.predict_eps_from_x0(x_t, k, x0_hat)
        abar = p._extract(p.alphas_cumprod, k, n)
        abar_prev = p._extract(p.alphas_cumprod_prev, k, n)
        sigma = self.eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        x_prev = abar_prev.sqrt() * x0_hat + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
        if self.eta > 0 and self.index < self.total - 1:
            x_prev = x_prev + sigma * self.noise.draw()
        return x_prev, x0_hat


R = TypeVar("R", bound=StepRecord)


def sample_steps(eps_fn: EpsFn, chain: StepDriven[R], *, x0_every: int | None = None) -> Iterator[R]:
    """Run ``chain`` (any ``StepDriven``) to the end, one network call per step, yielding each step's record.

    ``x0_every``: include x0-hat on every ``x0_every``-th step and on the last one (None: never, 1: always).
    """
    while not chain.done:
        i = chain.index
        want = x0_every is not None and is_preview_step(i, chain.total, x0_every)
        # Inference mode only around the work, never across ``yield``: the caller's code between steps (or
        # after it stops early without closing the generator) must run in its own autograd mode.
        with torch.inference_mode():
            x_t, t = chain.model_input()
            record = chain.step(eps_fn(x_t, t), want_x0=want)
        yield record


def sample(eps_fn: EpsFn, diffusion: GaussianDiffusion, num_images: int, shape: Sequence[int], *, seed: int = 0,
           first_index: int = 0, **chain_kwargs: object) -> torch.Tensor:
    """Sample ``num_images`` images (N, *shape) in [-1, 1]: images ``first_index..`` of request ``seed``.

    Image i is the same image in every call that includes it; bit-identical across calls of 2 or more images
    on the CPU, and with ``num_images=1`` too when ``eps_fn`` is ``model.inference.pad_lone_image(net)`` (the
    module docstring says why). ``chain_kwargs`` go to ``Chain`` (steps, sampler, eta, variance, clip_denoised).
    """
    noise = ImageNoise.for_images(seed, range(first_index, first_index + num_images), shape, diffusion.device)
    chain = Chain(diffusion, noise, **chain_kwargs)  # type: ignore[arg-type]
    for step in sample_steps(eps_fn, chain):
        last = step.x_prev
    return last.clamp(-1.0, 1.0)
