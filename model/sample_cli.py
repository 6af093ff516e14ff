"""``ddpm sample``: images, and optionally the progressive x0-hat strip (the paper's Fig. 6), from a checkpoint.

No service involved: load the checkpoint, run the reverse chain in chunks of ``--batch-size`` images, write a grid
PNG. Image ``i`` of ``--seed s`` is the same picture whatever ``--n`` and ``--batch-size`` (per-image noise
streams), so ``--n 4`` shows the first four images of ``--n 64``; bit for bit except where a chunk holds a lone
image on the CPU (``model.sampler``'s docstring says why). The progress bar lives here, not in the sampler.

Three modes (``model.latents``): plain sampling; ``--init-image FILE --start-t t`` (reconstructions, or with
``--n`` > 1 variations, of a picture diffused to t with q; ``--shared-latent`` decodes one x_t several times,
Fig. 7); ``--interpolate A B --start-t t --lambdas ...`` (Fig. 8: the interpolants in one row, between the two
fitted inputs). Input pictures are fitted to the model (L or RGB, shorter side resized, centre-cropped).
``--steps`` counts the reverse steps from the start timestep down (default: all of them).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from model.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint
from model.config import VARIANCE_TYPES
from model.images import grid, load_image, save_png, strip
from model.latents import DEFAULT_LAMBDAS, interpolation_chain, reconstruction_chain
from model.sampler import SAMPLERS, Chain, ImageNoise

__all__ = ["configure_parser", "frame_indices", "main", "sample_images"]

log = logging.getLogger(__name__)

ChainFor = Callable[[Sequence[int]], Chain]  # the chain of one chunk of output rows


def frame_indices(total_steps: int, frames: int) -> list[int]:
    """``frames`` step indices spread evenly over ``0..total_steps-1``, always including the last step."""
    if frames <= 1:
        return [total_steps - 1]
    return sorted({round(i * (total_steps - 1) / (frames - 1)) for i in range(frames)})


def run_chain(ckpt: LoadedCheckpoint, chain: Chain, *, frames: int = 0, progress: tqdm | None = None
              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``chain`` to the end: its final images (B, C, H, W) in [-1, 1] and ``frames`` x0-hat snapshots."""
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


def sample_images(ckpt: LoadedCheckpoint, indices: Sequence[int], *, seed: int, steps: int | None,
                  sampler: str, eta: float, variance: str | None, clip: bool | None,
                  frames: int = 0, progress: tqdm | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Images ``indices`` of request ``seed`` (B, C, H, W) in [-1, 1], and ``frames`` x0-hat snapshots of them."""
    cfg, device = ckpt.unet_config, ckpt.diffusion.device
    noise = ImageNoise.for_images(seed, indices, (cfg.in_channels, cfg.image_size, cfg.image_size), device)
    chain = Chain(ckpt.diffusion, noise, steps=steps, sampler=sampler, eta=eta,  # type: ignore[arg-type]
                  variance=variance, clip_denoised=clip)  # type: ignore[arg-type]
    return run_chain(ckpt, chain, frames=frames, progress=progress)


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
    edit = parser.add_argument_group("start from pictures (paper Sec. 4.3-4.4)")
    edit.add_argument("--init-image", metavar="FILE",
                      help="reconstruct (or with --n > 1 vary) this picture from x_t ~ q(x_t | x0) at --start-t")
    edit.add_argument("--interpolate", nargs=2, metavar=("A", "B"),
                      help="interpolate between two pictures encoded at --start-t; the row is A, the interpolants, B")
    edit.add_argument("--start-t", type=int, default=None,
                      help="timestep the pictures are diffused to, 1..T (default T/2: 500 of 1000)")
    edit.add_argument("--lambdas", type=_floats, default=DEFAULT_LAMBDAS, metavar="L,L,..",
                      help="interpolation weights in [0, 1] (default 0,0.1,...,1)")
    edit.add_argument("--shared-latent", action="store_true",
                      help="with --init-image: every image decodes the same x_t (Fig. 7) instead of its own")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _check(args: argparse.Namespace) -> str | None:
    if args.n < 1 or args.batch_size < 1:
        return "--n and --batch-size must be at least 1"
    if args.frames < 1:
        return "--frames must be at least 1"
    if not 0.0 <= args.eta <= 1.0:
        return "--eta must be between 0 and 1"
    if args.init_image and args.interpolate:
        return "--init-image and --interpolate are two different modes: give one"
    if args.shared_latent and not args.init_image:
        return "--shared-latent needs --init-image"
    if args.start_t is not None and not (args.init_image or args.interpolate):
        return "--start-t needs --init-image or --interpolate (plain sampling starts at T)"
    return None


def _plan(ckpt: LoadedCheckpoint, args: argparse.Namespace) -> tuple[ChainFor, int, str]:
    """The chain of a chunk of output rows for the chosen mode, the number of rows, and what they are."""
    cfg, d = ckpt.unet_config, ckpt.diffusion
    T = d.num_timesteps
    start_t = args.start_t if args.start_t is not None else T // 2
    kw = dict(sampler=args.sampler, eta=args.eta, variance=args.variance, clip_denoised=args.clip)
    if args.interpolate:
        a, b = (load_image(p, cfg.image_size, cfg.in_channels) for p in args.interpolate)
        lam = list(args.lambdas)
        interpolation_chain(d, a, b, lam, t=start_t, seed=args.seed, steps=args.steps)  # refuse bad input now
        return (lambda rows: interpolation_chain(d, a, b, [lam[r] for r in rows], t=start_t, seed=args.seed,
                                                 steps=args.steps, **kw),
                len(lam), f"{len(lam)} interpolants at t={start_t}")
    if args.init_image:
        x0 = load_image(args.init_image, cfg.image_size, cfg.in_channels)
        reconstruction_chain(d, x0, start_t=start_t, seed=args.seed, indices=[0], steps=args.steps)
        return (lambda rows: reconstruction_chain(d, x0, start_t=start_t, seed=args.seed, indices=rows,
                                                  steps=args.steps, shared_latent=args.shared_latent, **kw),
                args.n, f"{args.n} reconstructions from t={start_t}")
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    Chain(d, ImageNoise.for_images(args.seed, [0], shape, d.device), steps=args.steps)
    return (lambda rows: Chain(d, ImageNoise.for_images(args.seed, rows, shape, d.device), steps=args.steps,
                               **kw),  # type: ignore[arg-type]
            args.n, f"{args.n} images")


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
    try:
        chain_for, rows, what = _plan(ckpt, args)
    except (OSError, ValueError) as exc:  # unreadable picture, steps/start-t/lambdas out of range
        log.error("%s", exc)
        return 2
    ckpt.unet.cache_time_embeddings(ckpt.diffusion.num_timesteps)
    chunks = [list(range(i, min(i + args.batch_size, rows))) for i in range(0, rows, args.batch_size)]
    images, frames = [], []
    start = time.perf_counter()
    with tqdm(total=None, unit="step", desc="sampling") as bar:
        for chunk in chunks:
            chain = chain_for(chunk)
            bar.total = chain.total * len(chunks)
            out, snaps = run_chain(ckpt, chain, frames=args.frames if args.progressive else 0, progress=bar)
            images.append(out)
            frames.append(snaps)
    elapsed = time.perf_counter() - start
    result = torch.cat(images)
    if args.interpolate:
        cfg = ckpt.unet_config
        ends = [load_image(p, cfg.image_size, cfg.in_channels) for p in args.interpolate]
        save_png(grid(torch.cat([ends[0], result, ends[1]]), nrow=rows + 2), args.out)
    else:
        save_png(grid(result), args.out)
    print(f"wrote {args.out}: {what}, {chain.total} {args.sampler} steps, seed {args.seed}, "
          f"{elapsed:.1f} s on {device}")
    if args.progressive:
        per_frame = [torch.cat([chunk[f] for chunk in frames]) for f in range(len(frames[0]))]
        save_png(strip(per_frame), args.progressive)
        print(f"wrote {args.progressive}: {len(per_frame)} x0-hat frames per image")
    return 0
