"""The batching engine: many jobs' chains advanced together, one U-Net forward per model per tick.

Each job drives one step-driven chain (``model.sampler.StepDriven``) over its own rows, by its kind:

    generate      ``Chain`` from x_T ~ N(0, I); with an input picture, ``model.latents.reconstruction_chain``
                  (x_t ~ q(x_t | x_0) at ``start_t``, then the reverse chain): rows are the images made
    interpolate   ``model.latents.interpolation_chain``: one row per lambda
    likelihood    ``model.bound.BoundChain``: one row per picture measured, T steps (one term of the bound each)

Every one of them asks the network for eps on ``(x_t, t)`` rows that are independent of each other, so they all
batch together. A *tick* is one step for every job that fits in the batch:

1. pick jobs first come, first served until ``max_batch_size`` images (a job larger than that runs alone);
2. per model, concatenate their ``(x_t, t)`` into one forward pass; t is per sample, so jobs at different
   steps, with different samplers or step counts share the pass: the network only sees ``(x_t, t)``, and each
   job's own update (DDPM or DDIM, respaced or not) is its Chain's ``step`` on its slice of eps;
3. step each chain (x0-hat only on preview steps), hand frames and the final images (a likelihood job: its
   measurement) to the sink;
4. one ``sink.sync`` call: progress of the jobs that stepped (throttled) and the cancel check of all active
   jobs, so the worker can make it a single Redis round-trip; canceled jobs leave before the next tick.

Jobs join (``add``) and leave (finished, canceled, failed) between ticks. A job only ever shares the *forward*
with others; its chain, noise streams and updates are its own, so its images do not depend on its neighbours
as long as the forward's rows don't depend on the batch. On the CPU, oneDNN convolutions give row-identical
results for every batch of 2 or more images but a different kernel (last-bit differences) for a batch of 1;
``batch_invariant`` therefore pads a lone image to a batch of 2 (``model.inference.pad_lone_image``; measured cost
in benchmarks/README.md).
The inference options (``model.inference``: bf16 autocast, channels_last, compile, CUDA graphs) change the
forward's precision and kernels, not this property: with bf16 autocast or channels_last on the CPU a job's
images are still identical alone or batched (tested), only different from fp32's.

No host<->device synchronisation in a tick: schedules and timesteps are device tensors, the step counters are
Python ints, and the only reads back to the host are the sink's, on frames and final images.

This module knows the model's chains and torch; it does not know Redis, RQ, HTTP or PNG files (the sink does).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from model.bound import BoundChain, Likelihood, rd_grid
from model.checkpoint import load_checkpoint
from model.config import SamplerName
from model.diffusion import GaussianDiffusion
from model.inference import InferenceOptions, PreparedUNet, default_options, pad_lone_image, prepare
from model.latents import interpolation_chain, reconstruction_chain
from model.progressive import is_preview_step
from model.sampler import Chain, ImageNoise, Step, StepDriven
from model.unet import UNet
from service.resolve import DEFAULT_RD_POINTS
from service.schemas import JOB_KINDS

__all__ = ["Engine", "EngineSink", "JobRejected", "JobSpec", "Measurement", "ServedModel", "StepProgress",
           "TickStats"]

log = logging.getLogger(__name__)


class JobRejected(Exception):
    """A job this worker cannot run as asked; ``code`` and ``message`` are what the user sees."""

    def __init__(self, code: str, message: str):
        self.code, self.message = code, message
        super().__init__(f"{code}: {message}")


@dataclass(frozen=True)
class JobSpec:
    """What one job asks for (the API resolved every default before submitting). Timesteps are the paper's.

    ``num_images``: the job's rows (images made; for likelihood, pictures measured). ``inputs``: its input
    pictures (N, C, H, W) in [-1, 1] on the 8-bit grid, for a generate job with an input picture (one), an
    interpolation (two) and a likelihood job (one per row); None otherwise.
    """

    job_id: str
    model: str
    num_images: int
    seed: int
    steps: int
    sampler: SamplerName = "ddpm"
    eta: float = 0.0
    variance: str | None = None
    preview_every: int = 0  # 0: a frame at the last step only
    kind: str = "generate"
    inputs: torch.Tensor | None = field(default=None, compare=False, repr=False)
    start_t: int | None = None  # generate with an input picture: where the reverse chain starts
    shared_latent: bool = False
    t: int | None = None  # interpolate: the timestep of both encodings
    lambdas: tuple[float, ...] = ()
    rd_points: int = DEFAULT_RD_POINTS  # likelihood: timesteps of the rate-distortion curve

    @classmethod
    def from_request(cls, job_id: str, model: str, request: Mapping[str, Any], kind: str = "generate",
                     inputs: torch.Tensor | None = None) -> JobSpec:
        """Read a stored request; anything missing or of the wrong type is a ``JobRejected``."""
        try:
            if kind not in JOB_KINDS:
                raise ValueError(f"unknown job kind {kind!r}")
            start_t, t = request.get("start_t"), request.get("t")
            return cls(job_id=job_id, model=str(request.get("model") or model),
                       num_images=int(request["num_images"]), seed=int(request["seed"]), steps=int(request["steps"]),
                       sampler=request.get("sampler") or "ddpm", eta=float(request.get("eta") or 0.0),
                       variance=request.get("variance"), preview_every=int(request.get("preview_every") or 0),
                       kind=kind, inputs=inputs, start_t=None if start_t is None else int(start_t),
                       shared_latent=bool(request.get("shared_latent")), t=None if t is None else int(t),
                       lambdas=tuple(float(v) for v in request.get("lambdas") or ()),
                       rd_points=int(request.get("rd_points") or DEFAULT_RD_POINTS))
        except (KeyError, TypeError, ValueError) as exc:
            raise JobRejected("invalid_request", f"the stored request is incomplete or malformed ({exc!r}); "
                                                 "submit it again") from None

    @property
    def needs_inputs(self) -> int:
        """How many input pictures this job needs."""
        if self.kind == "interpolate":
            return 2
        if self.kind == "likelihood":
            return self.num_images
        return 0 if self.start_t is None else 1


@dataclass
class Measurement:
    """A finished likelihood job: the bound of its pictures, the timesteps of its rate-distortion curve, and how
    it was computed (the network's precision, whether x0-hat was clipped)."""

    likelihood: Likelihood
    grid: list[int]
    precision: str
    clip_denoised: bool

    def as_dict(self) -> dict[str, Any]:
        """The job's result (``service.schemas.LikelihoodResult``): bits/dim, every term (index s = L_s, the last
        L_T), and the rate and distortion of each picture at each timestep of the grid."""
        lik = self.likelihood.to("cpu")
        terms = torch.cat([lik.terms, lik.prior[:, None]], dim=1).double()
        rate, distortion = lik.rate().double(), lik.distortion().double()
        return {
            "bits_per_dim": [float(v) for v in lik.bits_per_dim.double()],
            "terms": [[float(f"{v:.7g}") for v in row] for row in terms.tolist()],
            "rate_distortion": [{"t": t, "rate_bits_per_dim": [float(f"{v:.7g}") for v in rate[:, t - 1].tolist()],
                                 "distortion_rmse": [float(f"{v:.7g}") for v in distortion[:, t - 1].tolist()]}
                                for t in self.grid],
            "num_timesteps": lik.num_timesteps, "clip_denoised": self.clip_denoised, "precision": self.precision,
        }


@dataclass
class StepProgress:
    """Where one job's chain stands after a tick (what the sink records as the job's progress)."""

    job_id: str
    step: int  # steps done, 1..total
    total: int
    t: int  # the timestep the network saw at that step


class ServedModel:
    """A loaded checkpoint ready to serve: the U-Net (eval mode, time embeddings cached) prepared with the
    inference ``options`` (default: ``model.inference.default_options`` for its device), and its process."""

    def __init__(self, name: str, unet: UNet, diffusion: GaussianDiffusion, *, batch_invariant: bool = False,
                 metadata: Mapping[str, Any] | None = None, options: InferenceOptions | None = None):
        self.name, self.unet, self.diffusion = name, unet, diffusion
        self.device = next(unet.parameters()).device
        cfg = unet.config
        self.shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        self.batch_invariant = batch_invariant
        self.metadata = dict(metadata or {})
        unet.eval()
        unet.cache_time_embeddings(diffusion.num_timesteps)
        self.eps_fn: PreparedUNet = prepare(unet, options or default_options(self.device), self.device)
        self.options = self.eps_fn.options
        self._forward = pad_lone_image(self.eps_fn) if batch_invariant else self.eps_fn

    @classmethod
    def load(cls, name: str, path: str, device: torch.device | str, *, batch_invariant: bool = False,
             options: InferenceOptions | None = None) -> ServedModel:
        ckpt = load_checkpoint(path, device=device)
        return cls(name, ckpt.unet, ckpt.diffusion, batch_invariant=batch_invariant, metadata=ckpt.metadata,
                   options=options)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps (fp32) for a batch; a lone image is padded to two rows when ``batch_invariant`` (module doc)."""
        return self._forward(x_t, t)

    def chain(self, spec: JobSpec) -> StepDriven[Any]:
        """The chain of ``spec``'s kind over its rows; a request the model can't serve is a ``JobRejected``."""
        T = self.diffusion.num_timesteps
        top = T if spec.kind == "likelihood" else spec.start_t or spec.t or T
        if not 1 <= spec.steps <= top:
            raise JobRejected("invalid_request", f"steps={spec.steps} is out of range for model {self.name!r}: "
                                                 f"it was trained with T={T}, so steps must be 1..{top}")
        if spec.num_images < 1:
            raise JobRejected("invalid_request", f"num_images must be at least 1, got {spec.num_images}")
        want = spec.needs_inputs
        x0 = spec.inputs
        if want and (x0 is None or x0.shape[0] != want or tuple(x0.shape[1:]) != self.shape):
            got = "none" if x0 is None else f"{tuple(x0.shape)}"
            raise JobRejected("invalid_request", f"the job needs {want} input picture(s) of shape {self.shape}, "
                                                 f"got {got}; submit it again")
        try:  # the chains are the check of every option they take (sampler, variance, eta...): ValueError
            return self._chain(spec, x0)
        except ValueError as exc:
            raise JobRejected("invalid_request", str(exc)) from None

    def _chain(self, spec: JobSpec, x0: torch.Tensor | None) -> StepDriven[Any]:
        options: dict[str, Any] = {"sampler": spec.sampler, "eta": spec.eta, "variance": spec.variance}
        if spec.kind == "likelihood" and x0 is not None:
            return BoundChain(self.diffusion, x0.to(self.device), seed=spec.seed, indices=range(spec.num_images),
                              variance=spec.variance)  # type: ignore[arg-type]
        if spec.kind == "interpolate" and x0 is not None:
            return interpolation_chain(self.diffusion, x0[:1], x0[1:], spec.lambdas, t=spec.t, seed=spec.seed,
                                       steps=spec.steps, **options)
        if x0 is not None:
            return reconstruction_chain(self.diffusion, x0, start_t=spec.start_t or self.diffusion.num_timesteps,
                                        seed=spec.seed, indices=range(spec.num_images), steps=spec.steps,
                                        shared_latent=spec.shared_latent, **options)
        noise = ImageNoise.for_images(spec.seed, range(spec.num_images), self.shape, self.device)
        return Chain(self.diffusion, noise, steps=spec.steps, **options)

    def measurement(self, spec: JobSpec, chain: BoundChain) -> Measurement:
        clip = self.diffusion.clip_denoised if chain.clip is None else chain.clip
        T = self.diffusion.num_timesteps
        return Measurement(chain.result(), rd_grid(T, max(1, min(spec.rd_points, T))),
                           self.options.precision, bool(clip))


class EngineSink(Protocol):
    """Where the engine's results go. Calls come from the denoising thread: implementations hand slow work
    (encoding, storage) to other threads and return at once, except ``sync``, the one synchronous call."""

    def sync(self, progress: Sequence[StepProgress], active: Sequence[str]) -> set[str]:
        """Record ``progress`` and return the ids among ``active`` whose cancellation was asked for."""
        ...

    def frame(self, job_id: str, step: int, t: int, x0_hat: torch.Tensor) -> None: ...

    def succeeded(self, job_id: str, images: torch.Tensor, last: StepProgress) -> None: ...

    def measured(self, job_id: str, measurement: Measurement, last: StepProgress) -> None: ...

    def canceled(self, job_id: str) -> None: ...

    def failed(self, job_id: str, code: str, message: str) -> None: ...

    def handed_back(self, job_id: str, reason: str) -> None: ...


@dataclass
class _Job:
    spec: JobSpec
    model: ServedModel
    chain: StepDriven[Any]
    last_progress: float = field(default=float("-inf"))

    def wants_frame(self, index: int) -> bool:
        return is_preview_step(index, self.chain.total, self.spec.preview_every)


@dataclass
class TickStats:
    """What one tick did: images through the U-Net, seconds in forward passes, seconds in the whole tick."""

    images: int = 0
    jobs: int = 0
    forward_s: float = 0.0
    total_s: float = 0.0
    per_model: dict[str, tuple[int, float]] = field(default_factory=dict)  # name -> (images, seconds)


class Engine:
    """Holds the active jobs and advances them one step per ``tick`` (see the module docstring).

    ``sync_forward``: on a GPU, time the forward with a device sync (for measurements; off in serving).
    """

    def __init__(self, models: Mapping[str, ServedModel], sink: EngineSink, *, max_batch_size: int = 64,
                 progress_interval: float = 0.25, clock: Callable[[], float] = time.monotonic,
                 sync_forward: bool = False):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.models = dict(models)
        self.sink = sink
        self.max_batch_size = max_batch_size
        self.progress_interval = progress_interval
        self.clock = clock
        self.sync_forward = sync_forward
        self._jobs: dict[str, _Job] = {}  # insertion order = arrival order (first come, first served)

    # ---- membership ----------------------------------------------------------------------------------------
    @property
    def job_ids(self) -> list[str]:
        return list(self._jobs)

    @property
    def active_images(self) -> int:
        return sum(j.spec.num_images for j in self._jobs.values())

    @property
    def idle(self) -> bool:
        return not self._jobs

    def has_room(self) -> bool:
        return self.active_images < self.max_batch_size

    def add(self, spec: JobSpec) -> None:
        """Admit a job; it takes part from the next tick. Raises ``JobRejected`` (nothing is kept then)."""
        model = self.models.get(spec.model)
        if model is None:
            raise JobRejected("model_unavailable", f"model {spec.model!r} is not loaded by this worker "
                                                   f"(it serves {sorted(self.models)})")
        if spec.job_id in self._jobs:
            raise JobRejected("duplicate", f"job {spec.job_id} is already running on this worker")
        self._jobs[spec.job_id] = _Job(spec, model, model.chain(spec))

    def remove(self, job_id: str) -> JobSpec | None:
        job = self._jobs.pop(job_id, None)
        return None if job is None else job.spec

    def hand_back_all(self, reason: str) -> list[str]:
        """Drop every active job, telling the sink to hand each back to the queue."""
        ids = list(self._jobs)
        for job_id in ids:
            del self._jobs[job_id]
            self.sink.handed_back(job_id, reason)
        return ids

    # ---- one step for everyone who fits ----------------------------------------------------------------------
    def _pick(self) -> list[_Job]:
        picked, used = [], 0
        for job in self._jobs.values():
            n = job.spec.num_images
            if used == 0 or used + n <= self.max_batch_size:
                picked.append(job)
                used += n
        return picked

    def tick(self) -> TickStats:
        """One denoising step for the jobs that fit, then the progress/cancel sync. No-op when idle."""
        stats = TickStats()
        start = self.clock()
        by_model: dict[str, list[_Job]] = {}
        for job in self._pick():
            by_model.setdefault(job.model.name, []).append(job)
        progress: list[StepProgress] = []
        for name, jobs in by_model.items():
            eps = self._forward(self.models[name], jobs, stats)
            if eps is not None:
                for job, eps_j in zip(jobs, eps, strict=True):
                    self._step(job, eps_j, progress)
        if self._jobs or progress:
            for job_id in self.sink.sync(progress, list(self._jobs)):
                if self._jobs.pop(job_id, None) is not None:
                    self.sink.canceled(job_id)
        stats.jobs = sum(len(j) for j in by_model.values())
        stats.total_s = self.clock() - start
        return stats

    def _forward(self, model: ServedModel, jobs: list[_Job], stats: TickStats) -> list[torch.Tensor] | None:
        """One U-Net pass over the jobs' images; eps split back per job. On an error every job in it fails."""
        inputs = [job.chain.model_input() for job in jobs]
        sizes = [x.shape[0] for x, _ in inputs]
        t0 = time.perf_counter()
        try:
            x = torch.cat([x for x, _ in inputs]) if len(inputs) > 1 else inputs[0][0]
            t = torch.cat([t for _, t in inputs]) if len(inputs) > 1 else inputs[0][1]
            eps = model.forward(x, t)
            if self.sync_forward and eps.is_cuda:
                torch.cuda.synchronize(eps.device)
        except Exception as exc:  # e.g. out of memory: the jobs can't go on, the worker can
            log.exception("forward pass of %d images on %s failed", sum(sizes), model.name)
            for job in jobs:
                self._jobs.pop(job.spec.job_id, None)
                self.sink.failed(job.spec.job_id, "internal",
                                 f"the model failed during a denoising step ({type(exc).__name__}: {exc}); "
                                 "try again, with fewer images if this persists")
            return None
        seconds = time.perf_counter() - t0
        stats.images += sum(sizes)
        stats.forward_s += seconds
        stats.per_model[model.name] = (sum(sizes), seconds)
        return list(eps.split(sizes))

    def _step(self, job: _Job, eps: torch.Tensor, progress: list[StepProgress]) -> None:
        index = job.chain.index
        want = job.wants_frame(index)
        try:
            step = job.chain.step(eps, want_x0=want)
        except Exception as exc:
            log.exception("update of job %s failed", job.spec.job_id)
            self._jobs.pop(job.spec.job_id, None)
            self.sink.failed(job.spec.job_id, "internal", f"a denoising update failed ({type(exc).__name__}: "
                                                          f"{exc}); try again")
            return
        done = StepProgress(job.spec.job_id, index + 1, step.total, step.t)
        if step.x0_hat is not None:
            self.sink.frame(job.spec.job_id, index + 1, step.t, step.x0_hat)
        if step.is_last:
            del self._jobs[job.spec.job_id]
            if isinstance(job.chain, BoundChain):
                self.sink.measured(job.spec.job_id, job.model.measurement(job.spec, job.chain), done)
            else:
                assert isinstance(step, Step)
                self.sink.succeeded(job.spec.job_id, step.x_prev.clamp(-1.0, 1.0), done)
            return
        now = self.clock()
        if want or now - job.last_progress >= self.progress_interval:
            job.last_progress = now
            progress.append(done)
