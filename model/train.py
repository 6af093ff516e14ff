"""``ddpm train``: Algorithm 1 (L_simple) with EMA, atomic resumable checkpoints, previews and metrics.

A run lives in one folder (``--out``)::

    config.json              the resolved RunConfig (preset + config file + flags), also printed at start
    metrics.jsonl            one JSON object per logged step (loss, lr, grad norm, steps/s, images/s, ...)
    checkpoints/ema-STEP.safetensors    servable: the EMA weights via ``model.checkpoint.save_checkpoint``
    checkpoints/state-STEP.safetensors  resumable: weights, EMA, Adam moments, step, RNG (no pickle)
    samples/grid-STEP.png, samples/strip-STEP.png   EMA samples and their progressive x0-hat (Fig. 6)

Determinism: the data order and each step's timesteps, noise and flips are functions of ``(seed, step)``
alone, and the global RNG (dropout) is saved with each state, so ``--resume`` continues bit for bit. The
global batch is drawn whole and then split over data-parallel ranks, so N processes compute the same update
as one. Launch several processes with ``torchrun --nproc_per_node N -m service.cli train ...``.

This module owns the training loop and the ``ddpm train`` command. The network, the diffusion maths, the
servable checkpoint format, the training-state file, the datasets and the config/flags belong to
``model.unet``, ``model.diffusion``, ``model.checkpoint``, ``model.train_state``, ``model.data`` and
``model.train_config``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import signal
import sys
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.checkpoint import save_checkpoint
from model.config import MODEL_PRESETS
from model.data import DatasetError, ImageSet, load_dataset, to_model_range
from model.diffusion import GaussianDiffusion
from model.ema import EMA
from model.images import grid, save_png, strip
from model.sampler import Chain, ImageNoise, sample_steps
from model.train_config import (
    RunConfig,
    TrainConfig,
    add_override_flags,
    load_config_file,
    overrides_from_args,
    resolve_config,
)
from model.train_state import ema_path, latest_state, optimizer_state, read_state, state_path, write_state
from model.unet import UNet

__all__ = ["BatchStream", "Trainer", "configure_parser", "main", "make_step_inputs"]

log = logging.getLogger(__name__)

PREVIEW_SEED = 1234  # the same noise at every preview, so grids over training are comparable


# ---- distributed context -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel run (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: torch.device) -> Dist:
    if not dist.is_torchelastic_launched():
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---- the data stream -------------------------------------------------------------------------------------------
class BatchStream:
    """Batch ``step`` of an endless stream of epochs, each a permutation seeded by ``(seed, epoch)``.

    Positions ``step * B .. (step + 1) * B`` of the concatenated epochs; a pure function of the step, so the
    data order resumes exactly without state.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        start = step * self.batch_size
        out: list[int] = []
        while len(out) < self.batch_size:
            epoch, pos = divmod(start + len(out), self.n)
            take = min(self.n - pos, self.batch_size - len(out))
            out.extend(self._epoch_perm(epoch)[pos:pos + take].tolist())
        return torch.tensor(out, dtype=torch.long)

    def position(self, step: int) -> dict[str, int]:
        epoch, pos = divmod(step * self.batch_size, self.n)
        return {"epoch": epoch, "position": pos}


@dataclass
class StepInputs:
    """One step's inputs for this rank: x0 in [-1, 1], t, eps noise."""

    x0: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor


def make_step_inputs(data: ImageSet, stream: BatchStream, step: int, cfg: TrainConfig, num_timesteps: int,
                     ddp: Dist, device: torch.device) -> StepInputs:
    """Draw the global batch of ``step`` (images, flips, t, noise from a ``(seed, step)`` generator); keep our part."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + 1)
    idx = stream.indices(step)
    b = len(idx)
    t = torch.randint(0, num_timesteps, (b,), generator=g)
    flips = torch.rand(b, generator=g) < 0.5
    noise = torch.randn((b, *data.shape), generator=g)
    part = slice(ddp.rank * b // ddp.world, (ddp.rank + 1) * b // ddp.world)
    x0 = to_model_range(data.images(idx[part]))
    if cfg.random_flip:
        x0 = torch.where(flips[part, None, None, None], x0.flip(-1), x0)
    return StepInputs(x0.to(device), t[part].to(device), noise[part].to(device))


# ---- the trainer ---------------------------------------------------------------------------------------------
class Trainer:
    """One training run: model, EMA, Adam, data; ``run()`` trains until ``train.steps`` (or a stop)."""

    def __init__(self, config: RunConfig, run_dir: Path, *, ddp: Dist | None = None,
                 device: torch.device | None = None):
        self.config, self.cfg, self.run_dir = config, config.train, Path(run_dir)
        self.device = device or _pick_device(self.cfg.device)
        self.ddp = ddp or Dist()
        if self.cfg.batch_size % self.ddp.world:
            raise ValueError(f"batch_size {self.cfg.batch_size} is not divisible by {self.ddp.world} processes")
        u = config.unet
        self.data = load_dataset(self.cfg.dataset, u.image_size, u.in_channels, "train", holdout=self.cfg.holdout)
        self.stream = BatchStream(len(self.data), self.cfg.batch_size, self.cfg.seed)
        torch.manual_seed(self.cfg.seed)
        self.model = UNet(u).to(self.device)
        self.diffusion = GaussianDiffusion.from_config(config.diffusion, device=self.device)
        self.ema = EMA(self.model, self.cfg.ema_decay, warmup=self.cfg.ema_warmup)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr,
                                          betas=(self.cfg.adam_beta1, self.cfg.adam_beta2))
        self.net: nn.Module = self.model
        if self.ddp.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            self.net = typing.cast(nn.Module, torch.compile(self.net))
        self.step = 0
        self.stop_requested = False
        self.stop_signal: int | None = None
        self.stopped_early = False  # a stop request (on any process) ended the run before its last step
        self._tb: Any = None

    # -- one step ----------------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then constant (the official code)."""
        w = self.cfg.warmup_steps
        return self.cfg.lr * (min(1.0, (step + 1) / w) if w > 0 else 1.0)

    def train_step(self) -> dict[str, float]:
        """Algorithm 1 on one global batch: returns the loss (mean over all ranks), grad norm and lr."""
        inp = make_step_inputs(self.data, self.stream, self.step, self.cfg, self.diffusion.num_timesteps,
                               self.ddp, self.device)
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"):
            loss = self.diffusion.training_losses(lambda x, t: self.net(x, t).float(), inp.x0, inp.t,
                                                  inp.noise).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1
        loss_d = loss.detach()
        if self.ddp.world > 1:
            dist.all_reduce(loss_d)
            loss_d /= self.ddp.world
        return {"loss": float(loss_d), "grad_norm": float(grad_norm), "lr": lr}

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write the servable EMA checkpoint and the training state for the current step (rank 0 only)."""
        if self.ddp.main:
            extra = {"ema_decay": self.cfg.ema_decay, "preset": self.config.preset, "lr": self.cfg.lr,
                     "batch_size": self.cfg.batch_size}
            save_checkpoint(ema_path(self.run_dir, self.step), self.ema.state_dict(), self.config.unet,
                            self.config.diffusion, dataset=self.cfg.dataset, step=self.step, ema=True, extra=extra)
            self._save_state()
            self._prune()
        if self.ddp.world > 1:
            dist.barrier()
        return state_path(self.run_dir, self.step)

    def _save_state(self) -> None:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        write_state(state_path(self.run_dir, self.step), model=self.model.state_dict(), ema=self.ema.state_dict(),
                    optimizer=self.optimizer, rng=rng, config_json=self.config.to_json(),
                    state={"step": self.step, "ema_updates": self.ema.num_updates,
                           "data": self.stream.position(self.step), "world_size": self.ddp.world})

    def _prune(self) -> None:
        states = sorted((self.run_dir / "checkpoints").glob("state-*.safetensors"))
        for old in states[: -self.cfg.keep_checkpoints]:
            step = int(old.stem.split("-")[1])
            old.unlink(missing_ok=True)
            ema_path(self.run_dir, step).unlink(missing_ok=True)

    def load(self, path: Path) -> None:
        """Restore everything saved by ``save``: weights, EMA, optimizer, step and RNG."""
        groups, state = read_state(path)
        self.model.load_state_dict(groups["model"])
        self.ema.load_state_dict(groups["ema"], state["ema_updates"])
        self.optimizer.load_state_dict(optimizer_state(groups["optim"], state["optimizer"]))
        torch.set_rng_state(groups["rng"]["cpu"])
        if "cuda" in groups["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(groups["rng"]["cuda"], self.device)
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", path, self.step)

    # -- previews ------------------------------------------------------------------------------------------------
    def ema_unet(self) -> UNet:
        net = UNet(self.config.unet).to(self.device)
        net.load_state_dict(self.ema.state_dict())
        net.eval().cache_time_embeddings(self.diffusion.num_timesteps)
        return net

    def write_previews(self) -> None:
        """EMA samples as a grid, and the progressive x0-hat of the first 8 as a strip (paper Fig. 6)."""
        net, n = self.ema_unet(), self.cfg.num_samples
        noise = ImageNoise.for_images(PREVIEW_SEED, range(n), self.data.shape, self.device)
        chain = Chain(self.diffusion, noise, steps=min(self.cfg.sample_steps, self.diffusion.num_timesteps))
        every = max(1, chain.total // 10)
        frames = []
        for st in sample_steps(net, chain, x0_every=every):
            if st.x0_hat is not None:
                frames.append(st.x0_hat[:8].cpu())
            final = st.x_prev
        out = self.run_dir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        save_png(grid(final.clamp(-1, 1).cpu()), out / f"grid-{self.step:08d}.png")
        save_png(strip(frames), out / f"strip-{self.step:08d}.png")
        if self._tb is not None:
            self._tb.add_image("samples", (grid(final.clamp(-1, 1).cpu()) + 1) / 2, self.step)

    # -- the loop ------------------------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step":
                    self._tb.add_scalar(f"train/{k}", v, record["step"])

    def _trim_metrics(self) -> None:
        """After a resume, drop log lines written after the checkpoint we resumed from (they will be redone)."""
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in keep))

    def _open_tensorboard(self) -> None:
        if not (self.cfg.tensorboard and self.ddp.main):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed (pip install tensorboard); continuing without it")
            return
        self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def _should_stop(self) -> bool:
        flag = torch.tensor([1 if self.stop_requested else 0])
        if self.ddp.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def run(self, stop_after: int | None = None) -> int:
        """Train to ``train.steps``; ``stop_after`` steps at most this session. Returns the step reached."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.ddp.main:
            self._trim_metrics()
            self._open_tensorboard()
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        bar = _progress(self.step, cfg.steps, enabled=self.ddp.main)
        t_last, s_last, t0 = time.perf_counter(), self.step, time.perf_counter()
        while self.step < end:
            m = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
            if self.step % cfg.log_every == 0 and self.ddp.main:
                now = time.perf_counter()
                sps = (self.step - s_last) / max(now - t_last, 1e-9)
                self._log({"step": self.step, **m, "steps_per_s": sps, "images_per_s": sps * cfg.batch_size,
                           "ema_decay": self.ema.current_decay(), "elapsed_s": now - t0})
                t_last, s_last = now, self.step
            stopping = self._should_stop()
            if self.step % cfg.checkpoint_every == 0 or self.step == end or stopping:
                self.save()
            if self.ddp.main and (self.step % cfg.sample_every == 0 or self.step == cfg.steps):
                self.write_previews()
            if stopping:
                log.warning("stop requested: checkpoint written at step %d; resume with --resume", self.step)
                self.stopped_early = self.step < cfg.steps
                break
        bar.close()
        if self._tb is not None:
            self._tb.close()
        return self.step


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


def _progress(initial: int, total: int, *, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=0.5 if tty else 30.0,
                desc="train")


# ---- the CLI -------------------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="digits", choices=sorted(MODEL_PRESETS),
                        help="model + training preset (default: digits)")
    parser.add_argument("--config", metavar="FILE", help="JSON or YAML file of overrides ({train, unet, diffusion})")
    parser.add_argument("--out", metavar="RUN_DIR", help="run folder (default: runs/<preset>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoint (flags may change train fields)")
    parser.add_argument("--stop-after", type=int, metavar="N", help="stop (with a checkpoint) after N more steps")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_override_flags(parser)


def resolve_from_args(args: argparse.Namespace, run_dir: Path) -> RunConfig:
    """The run's config: saved config (on --resume) or preset + file + flags. ``ValueError`` on bad values."""
    overrides = overrides_from_args(args)
    file_overrides = load_config_file(args.config) if args.config else {}
    if args.resume:
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise ValueError(f"--resume: {saved} not found (is --out the run folder?)")
        base = RunConfig.from_dict(json.loads(saved.read_text()))
        saved_parts = {"unet": base.unet.to_dict(), "diffusion": base.diffusion.to_dict()}
        changed = {f"{s}.{k}": v for s, part in saved_parts.items() for k, v in overrides[s].items()
                   if json.dumps(list(v) if isinstance(v, tuple) else v) != json.dumps(part[k])}
        if changed:
            raise ValueError(f"--resume cannot change the model or diffusion: {changed}")
        train = base.train.to_dict() | file_overrides.get("train", {}) | overrides["train"]
        return RunConfig(base.preset, TrainConfig(**train), base.unet, base.diffusion)
    return resolve_config(args.preset, file_overrides, overrides)


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """SIGINT/SIGTERM finish the current step, write a checkpoint and stop (a second Ctrl-C aborts)."""
    def handler(signum: int, frame: Any) -> None:
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.stop_requested = True
        trainer.stop_signal = signum
        log.warning("signal %d: stopping after this step", signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(args: argparse.Namespace) -> int:
    run_dir = Path(args.out or f"runs/{args.preset}")
    try:
        config = resolve_from_args(args, run_dir)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device = _pick_device(config.train.device)
    ddp = _setup_distributed(device)
    if device.type == "cuda" and ddp.world > 1:
        device = torch.device("cuda", ddp.rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if ddp.main:
        print(config.to_json())
    if args.print_config:
        return 0
    state = latest_state(run_dir) if args.resume else None
    if args.resume and state is None:
        print(f"error: --resume: no checkpoint in {run_dir / 'checkpoints'}", file=sys.stderr)
        return 2
    if not args.resume and latest_state(run_dir) is not None:
        print(f"error: {run_dir} already holds a run; pass --resume to continue it or choose another --out",
              file=sys.stderr)
        return 2
    try:
        trainer = Trainer(config, run_dir, ddp=ddp, device=device)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if state is not None:
        trainer.load(state)
    if ddp.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(config.to_json() + "\n")
        log.info("%s: %d training images, %.2fM parameters, device %s, %d process(es)", config.train.dataset,
                 len(trainer.data), trainer.model.num_parameters() / 1e6, device, ddp.world)
    with _stop_on_signals(trainer):
        trainer.run(stop_after=args.stop_after)
    if dist.is_initialized():
        dist.destroy_process_group()
    if trainer.stopped_early:
        # Stopped by a signal before the last step: not a success (a Kubernetes Job retries with --resume).
        return 128 + (trainer.stop_signal or signal.SIGTERM)
    return 0
