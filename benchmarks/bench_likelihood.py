"""A likelihood computation (the full T-term bound, ``model.bound``) against T forwards of the bare U-Net.

For each batch size in ``--batches``, side by side in one run, interleaved (forwards, likelihood, forwards, ...)
after a warm-up of each so a shared machine's load falls on both alike:

- *forwards*: T calls of the U-Net on a fixed (B, C, H, W) input with t = T-1 .. 0 (the network's cost alone);
- *likelihood*: ``likelihood(unet, diffusion, x0)`` on B images: per step, each image's q-noise drawn from its
  own stream, q_sample, the forward, the KL / decoder term and the x0-hat error (``BoundChain.step``).

- *steps alone*: the same T ``BoundChain.step`` calls with a fixed eps and no network (the bookkeeping alone).

``likelihood_over_forwards`` = median likelihood seconds / median forward seconds (1.0: the bookkeeping is free);
``overhead_ms_per_step`` = the difference per step; ``step_ms`` and ``step_share_pct`` = steps alone per step and
as a share of (forward + step): on a loaded machine the difference of two long timings is noisy, the short
step-alone timing much less so. Models: the demo checkpoint by default, else a preset with
random weights (timing only). One JSON per run in ``$OUT`` when set, else ``benchmarks/results/``.

    .venv/bin/python benchmarks/bench_likelihood.py --batches 1 16 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from model.bound import BoundChain, likelihood
from model.checkpoint import load_checkpoint
from model.config import MODEL_PRESETS
from model.diffusion import EpsFn, GaussianDiffusion
from model.inference import InferenceOptions, prepare
from model.unet import UNet

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "checkpoints" / "digits.safetensors"


def load(args: argparse.Namespace, device: torch.device) -> tuple[UNet, GaussianDiffusion, str]:
    if args.preset is None and DEMO.is_file():
        ckpt = load_checkpoint(DEMO, device=device)
        return ckpt.unet, ckpt.diffusion, "demo checkpoint (digits)"
    preset = MODEL_PRESETS[args.preset or "digits"]
    torch.manual_seed(0)
    unet = UNet(preset.unet).to(device).eval()
    with torch.no_grad():  # zero-initialised output layers would make eps identically 0
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return unet, GaussianDiffusion.from_config(preset.diffusion, device=device), f"{args.preset} (random weights)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def row(eps_fn: EpsFn, diffusion: GaussianDiffusion, shape: tuple[int, ...], batch: int, repeats: int,
        device: torch.device) -> dict[str, Any]:
    T = diffusion.num_timesteps
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, 256, (batch, *shape), generator=g).float() / 127.5 - 1.0).to(device)
    x = torch.randn(batch, *shape, generator=g).to(device)
    ts = [torch.full((batch,), t, dtype=torch.long, device=device) for t in range(T - 1, -1, -1)]

    def forwards() -> None:
        with torch.inference_mode():
            for t in ts:
                eps_fn(x, t)

    def bound() -> None:
        likelihood(eps_fn, diffusion, x0, seed=0)

    eps = torch.randn(batch, *shape, generator=g).to(device)

    def steps_alone() -> None:
        chain = BoundChain(diffusion, x0, seed=0)
        with torch.inference_mode():
            while not chain.done:
                chain.step(eps)

    forwards()  # warm-up: allocator, kernel choice
    bound()
    fwd, lik, alone = [], [], []
    for _ in range(repeats):
        fwd.append(timed(forwards, device))
        lik.append(timed(bound, device))
        alone.append(timed(steps_alone, device))
    f, b, a = statistics.median(fwd), statistics.median(lik), statistics.median(alone)
    ratios = [b_ / f_ for f_, b_ in zip(fwd, lik, strict=True)]
    return {"batch": batch, "timesteps": T, "forwards_s": f, "likelihood_s": b, "likelihood_over_forwards": b / f,
            "ratio_min": min(ratios), "ratio_max": max(ratios), "overhead_ms_per_step": 1000 * (b - f) / T,
            "step_ms": 1000 * a / T, "step_share_pct": 100 * a / (a + f),
            "forwards_runs_s": fwd, "likelihood_runs_s": lik, "steps_alone_runs_s": alone}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(MODEL_PRESETS), default=None,
                        help="random-weight preset instead of the demo checkpoint")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="the U-Net's precision (model.inference), the same on both sides")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    unet, diffusion, what = load(args, device)
    unet.cache_time_embeddings(diffusion.num_timesteps)
    eps_fn = prepare(unet, InferenceOptions(precision=args.precision), device)
    cfg = unet.config
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    rows = []
    for batch in args.batches:
        rows.append(row(eps_fn, diffusion, shape, batch, args.repeats, device))
        r = rows[-1]
        print(f"batch {batch:4d}: {r['timesteps']} forwards {r['forwards_s']:.2f} s, likelihood "
              f"{r['likelihood_s']:.2f} s, ratio {r['likelihood_over_forwards']:.3f} "
              f"({r['ratio_min']:.3f}-{r['ratio_max']:.3f}), +{r['overhead_ms_per_step']:.3f} ms/step; steps alone "
              f"{r['step_ms']:.3f} ms/step = {r['step_share_pct']:.2f}% of forward + step", flush=True)
    cpu_name = platform.processor() or platform.machine()
    report = {"script": "bench_likelihood", "model": what, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name,
              "precision": args.precision, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "repeats": args.repeats, "rows": rows,
              # the figure quoted in benchmarks/README.md and docs/figures: the largest batch of the run
              "likelihood_over_forwards": rows[-1]["likelihood_over_forwards"]}
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = out_dir / f"bench_likelihood-{device.type}-{stamp}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"raw: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
