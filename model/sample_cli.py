"""``ddpm sample``: images, and optionally the progressive x0-hat strip (the paper's Fig. 6), from a checkpoint.

No service involved: load the checkpoint, run the reverse chain in chunks of ``--batch-size`` images, write a grid
PNG. Image ``i`` of ``--seed s`` is the same whatever ``--n`` and ``--batch-size`` (per-image noise streams), so
``--n 4`` shows the first four images of ``--n 64``. The progress bar lives here, not in the sampler.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence

import torch
from tqdm import tqdm

from model.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint
from model.config import VARIANCE_TYPES
from model.images import grid, save_png, strip
from model.sampler import SAMPLERS, Chain, ImageNoise

__all__ = ["configure_parser", "frame_indices", "main", "sample_images"]

log = logging.getLogger(__name__)


def frame_indices(total_steps: int, frames: int) -> list[int]:
    """``frames`` step indices spread evenly over ``0..total_steps-1``, always including the last step."""
    if frames <= 1:
        return [total_steps - 1]
    return sorted({round(i * (total_steps - 1) / (frames - 1)) for i in range(frames)})


def sample_images(ckpt: LoadedCheckpoint, indices: Sequence[int], *, seed: int, steps: int | None,
                  sampler: str, eta: float, variance: str | None, clip: bool | None,
                  frames: int = 0, progress: tqdm | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Images ``indices`` of request ``seed`` (B, C, H, W) in [-1, 1], and ``frames`` x0-hat snapshots of them."""
    cfg, device = ckpt.unet_config, ckpt.diffusion.device
    noise = ImageNoise.for_images(seed, indices, (cfg.in_channels, cfg.image_size, cfg.image_size), device)
    chain = Chain(ckpt.diffusion, noise, steps=steps, sampler=sampler, eta=eta,  # type: ignore[arg-type]
                  variance=variance, clip_denoised=clip)  # type: ignore[arg-type]
    wanted = set(frame_indices(chain.total, frames)) if frames else set()
    snapshots = []
    with torch.inference_mode():
        while not chain.done:
            x_t, t = chain.model_input()
            record = chain.step(ckpt.unet(x_t, t), want_x0=chain.index in wanted)
            if record.x0_hat is not None:
                snapshots.append(record.x0_hat.cpu())
            if progress is not None:
                progress.update(1)
    return record.x_prev.clamp(-1.0, 1.0).cpu(), snapshots


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="FILE", help="a .safetensors checkpoint")
    parser.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: all T)")
    parser.add_argument("--seed", type=int, default=0, help="request seed: image i is reproducible from it")
    parser.add_argument("--out", default="grid.png", metavar="PNG", help="grid of the final images")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale in [0, 1] (0: deterministic)")
    parser.add_argument("--variance", choices=VARIANCE_TYPES, default=None,
                        help="DDPM reverse variance (default: the checkpoint's)")
    parser.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                        help="clip x0-hat to [-1, 1] at each step (default: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--progressive", default=None, metavar="PNG",
                        help="also write the x0-hat strip over time (one row per image, paper Fig. 6)")
    parser.add_argument("--frames", type=int, default=10, help="frames in the progressive strip")


def _check(args: argparse.Namespace) -> str | None:
    if args.n < 1 or args.batch_size < 1:
        return "--n and --batch-size must be at least 1"
    if args.frames < 1:
        return "--frames must be at least 1"
    if not 0.0 <= args.eta <= 1.0:
        return "--eta must be between 0 and 1"
    return None


def main(args: argparse.Namespace) -> int:
    problem = _check(args)
    if problem:
        log.error("%s", problem)
        return 2
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        ckpt = load_checkpoint(args.checkpoint, device=device)
    except CheckpointError as exc:
        log.error("%s", exc)
        return 2
    T = ckpt.diffusion.num_timesteps
    steps = args.steps if args.steps is not None else T
    if not 1 <= steps <= T:
        log.error("--steps must be between 1 and %d (the checkpoint's T)", T)
        return 2
    ckpt.unet.cache_time_embeddings(T)
    chunks = [list(range(i, min(i + args.batch_size, args.n))) for i in range(0, args.n, args.batch_size)]
    images, frames = [], []
    start = time.perf_counter()
    with tqdm(total=steps * len(chunks), unit="step", desc="sampling") as bar:
        for chunk in chunks:
            out, snaps = sample_images(ckpt, chunk, seed=args.seed, steps=steps, sampler=args.sampler,
                                       eta=args.eta, variance=args.variance, clip=args.clip,
                                       frames=args.frames if args.progressive else 0, progress=bar)
            images.append(out)
            frames.append(snaps)
    elapsed = time.perf_counter() - start
    save_png(grid(torch.cat(images)), args.out)
    print(f"wrote {args.out}: {args.n} images, {steps} {args.sampler} steps, seed {args.seed}, "
          f"{elapsed:.1f} s on {device}")
    if args.progressive:
        per_frame = [torch.cat([chunk[f] for chunk in frames]) for f in range(len(frames[0]))]
        save_png(strip(per_frame), args.progressive)
        print(f"wrote {args.progressive}: {len(per_frame)} x0-hat frames per image")
    return 0
