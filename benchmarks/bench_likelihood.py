"""A likelihood computation (the full T-term bound, ``model.bound``) against T forwards of the bare U-Net.

For each batch size in ``--batches``, side by side in one run, in interleaved rounds (forwards, likelihood, steps
alone, forwards, ...) after a warm-up round, so a shared machine's load falls on all alike:

- *forwards*: T calls of the U-Net on a fixed (B, C, H, W) input with t = T-1 .. 0 (the network's cost alone);
- *likelihood*: ``likelihood(unet, diffusion, x0)`` on B images: per step, each image's q-noise drawn from its
  own stream, q_sample, the forward, the KL / decoder term and the x0-hat error (``BoundChain.step``);
- *steps alone*: the same T ``BoundChain.step`` calls with a fixed eps and no network (the bookkeeping alone).

``likelihood_over_forwards`` = likelihood seconds / forward seconds, the median of the rounds (1.0: the
bookkeeping is free); ``overhead_ms_per_step`` = the difference of the medians per step; ``step_ms`` and
``step_share_pct`` = steps alone per step and as a share of (forward + step): on a loaded machine the difference
of two long timings is noisy, the short step-alone timing much less so. Model: the demo checkpoint by default,
else a preset with random weights (timing only). One JSON per run in ``benchmarks/results/``.

    .venv/bin/python -m benchmarks.bench_likelihood --batches 1 16 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.common import Run, add_out_argument, compare, interleaved, set_threads, timer
from benchmarks.models import DEMO_CHECKPOINT, random_model
from model.bound import BoundChain, likelihood
from model.checkpoint import load_checkpoint
from model.config import MODEL_PRESETS
from model.diffusion import EpsFn, GaussianDiffusion
from model.inference import InferenceOptions, prepare
from model.unet import UNet


def load(preset: str | None, device: torch.device) -> tuple[UNet, GaussianDiffusion, str]:
    """The demo checkpoint unless a preset is asked for (or the demo is missing): random weights of the preset."""
    if preset is None and DEMO_CHECKPOINT.is_file():
        ckpt = load_checkpoint(DEMO_CHECKPOINT, device=device)
        return ckpt.unet, ckpt.diffusion, "demo checkpoint (digits)"
    unet, diffusion = random_model(preset or "digits", device)
    return unet, diffusion, f"{preset or 'digits'} (random weights)"


def row(eps_fn: EpsFn, diffusion: GaussianDiffusion, shape: tuple[int, ...], batch: int, repeats: int,
        device: torch.device) -> dict[str, Any]:
    T = diffusion.num_timesteps
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, 256, (batch, *shape), generator=g).float() / 127.5 - 1.0).to(device)
    x = torch.randn(batch, *shape, generator=g).to(device)
    ts = [torch.full((batch,), t, dtype=torch.long, device=device) for t in range(T - 1, -1, -1)]
    eps = torch.randn(batch, *shape, generator=g).to(device)

    def forwards() -> None:
        with torch.inference_mode():
            for t in ts:
                eps_fn(x, t)

    def bound() -> None:
        likelihood(eps_fn, diffusion, x0, seed=0)

    def steps_alone() -> None:
        chain = BoundChain(diffusion, x0, seed=0)
        with torch.inference_mode():
            while not chain.done:
                chain.step(eps)

    t = interleaved({"forwards": timer(forwards, device), "likelihood": timer(bound, device),
                     "steps_alone": timer(steps_alone, device)}, repeats)
    f, b, a = (statistics.median(t[k]) for k in ("forwards", "likelihood", "steps_alone"))
    return {"batch": batch, "timesteps": T, "forwards_s": f, "likelihood_s": b,
            **compare(t["likelihood"], t["forwards"], "likelihood_over_forwards"),
            "overhead_ms_per_step": 1000 * (b - f) / T, "step_ms": 1000 * a / T, "step_share_pct": 100 * a / (a + f),
            "forwards_runs_s": t["forwards"], "likelihood_runs_s": t["likelihood"],
            "steps_alone_runs_s": t["steps_alone"]}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(MODEL_PRESETS), default=None,
                        help="random-weight preset instead of the demo checkpoint")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="the U-Net's precision (model.inference), the same on both sides")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add_out_argument(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run("bench_likelihood", args, args.device, argv)
    set_threads(args.threads)
    device = torch.device(args.device)
    unet, diffusion, what = load(args.preset, device)
    unet.cache_time_embeddings(diffusion.num_timesteps)
    eps_fn = prepare(unet, InferenceOptions(precision=args.precision), device)
    shape = (unet.config.in_channels, unet.config.image_size, unet.config.image_size)
    rows = []
    for batch in args.batches:
        rows.append(r := row(eps_fn, diffusion, shape, batch, args.repeats, device))
        print(f"batch {batch:4d}: {r['timesteps']} forwards {r['forwards_s']:.2f} s, likelihood "
              f"{r['likelihood_s']:.2f} s, likelihood / forwards {r['likelihood_over_forwards']:.3f} "
              f"({r['likelihood_over_forwards_min']:.3f}-{r['likelihood_over_forwards_max']:.3f}), "
              f"+{r['overhead_ms_per_step']:.3f} ms/step; steps alone {r['step_ms']:.3f} ms/step = "
              f"{r['step_share_pct']:.2f}% of forward + step", flush=True)
    report = {"model": what, "device": str(device), "precision": args.precision, "repeats": args.repeats,
              "rows": rows,
              # the figure quoted in benchmarks/README.md and docs/figures: the largest batch of the run
              "likelihood_over_forwards": rows[-1]["likelihood_over_forwards"]}
    print(f"raw: {run.write(report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
