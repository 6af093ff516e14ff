"""Sampler benchmarks, measured side by side in one run and reported as ratios.

(a) Per-step overhead: the time of our ``Chain.step`` (schedule look-ups, per-image noise, the update, x0-hat)
    against the bare U-Net forward it wraps, for a model preset, per batch size and sampler.
(b) Our U-Net + sampler against diffusers' ``DDPMPipeline`` on the same weights: a random-init diffusers
    ``UNet2DModel`` in the paper's CIFAR10 layout (35.7M parameters) is saved, converted with our importer
    (``model.convert``), and both sample the same number of steps and images.

Prints a table and writes JSON to ``benchmarks/results/``. diffusers is a benchmark/test-only dependency.

    python benchmarks/bench_sampler.py --steps 20 --batches 1 16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import LoadedCheckpoint, load_checkpoint
from model.config import model_preset
from model.convert import import_diffusers
from model.diffusion import GaussianDiffusion
from model.images import to_uint8
from model.sampler import Chain, ImageNoise
from model.unet import UNet

log = logging.getLogger("bench_sampler")

# google/ddpm-cifar10-32's UNet2DModel config (docs/MATHS.md, "The paper's released weights").
CIFAR10_DIFFUSERS = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2, "freq_shift": 1, "flip_sin_to_cos": False, "downsample_padding": 0,
    "norm_eps": 1e-6, "norm_num_groups": 32, "attention_head_dim": None,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: bool = True) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, after one warm-up run unless told not to (seconds)."""
    if warmup:
        fn()
        sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- (a) per-step overhead ----------------------------------------------------------------------------------------
VARIANTS = (("ddpm", False), ("ddpm", True), ("ddim", False))  # (sampler, x0-hat every step)


def overhead_rows(unet: UNet, diffusion: GaussianDiffusion, batch: int, steps: int, repeats: int
                  ) -> list[dict[str, Any]]:
    """Per step: the bare forward, ``Chain.step`` alone (fixed eps) per variant, and the whole loop (ddpm)."""
    cfg, device = unet.config, diffusion.device
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    eps = torch.randn(batch, *shape, device=device)

    def chain(sampler: str) -> Chain:
        return Chain(diffusion, ImageNoise.for_images(0, range(batch), shape, device), steps=steps,
                     sampler=sampler)  # type: ignore[arg-type]

    @torch.inference_mode()
    def forwards_only() -> None:
        c = chain("ddpm")
        for i in range(steps):
            unet(c.x, c._t_model[i].expand(batch))

    def steps_only(sampler: str, want_x0: bool) -> Callable[[], None]:
        @torch.inference_mode()
        def run() -> None:
            c = chain(sampler)
            while not c.done:
                c.step(eps, want_x0=want_x0)
        return run

    @torch.inference_mode()
    def full() -> None:
        c = chain("ddpm")
        while not c.done:
            x_t, t = c.model_input()
            c.step(unet(x_t, t))

    fwd = timed(forwards_only, device, repeats) / steps
    tot = timed(full, device, repeats) / steps
    rows = []
    for sampler, want_x0 in VARIANTS:
        stp = timed(steps_only(sampler, want_x0), device, max(repeats, 5)) / steps
        rows.append({"batch": batch, "sampler": sampler, "x0_hat": want_x0, "forward_ms": 1e3 * fwd,
                     "step_ms": 1e3 * stp, "step_share_pct": 100 * stp / (fwd + stp),
                     "loop_ms": 1e3 * tot if (sampler, want_x0) == VARIANTS[0] else None})
    return rows


# ---- (b) ours vs diffusers ----------------------------------------------------------------------------------------
def converted_cifar10(folder: Path, device: torch.device) -> tuple[Any, Any, LoadedCheckpoint]:
    """A random-init diffusers CIFAR10 UNet2DModel + DDPMScheduler, and the same weights through our importer."""
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**CIFAR10_DIFFUSERS).eval()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                        variance_type="fixed_large", clip_sample=True)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder / "ddpm-cifar10-random")
    import_diffusers(folder / "ddpm-cifar10-random", folder / "ours.safetensors")
    ckpt = load_checkpoint(folder / "ours.safetensors", device=device)
    ckpt.unet.cache_time_embeddings(ckpt.diffusion.num_timesteps)
    return unet.to(device), scheduler, ckpt


def max_eps_difference(ref_unet: Any, ckpt: LoadedCheckpoint, device: torch.device) -> float:
    x = torch.randn(2, 3, 32, 32, device=device)
    t = torch.tensor([10, 900], device=device)
    with torch.inference_mode():
        return float((ref_unet(x, t).sample - ckpt.unet(x, t)).abs().max())


def versus_row(ref_unet: Any, scheduler: Any, ckpt: LoadedCheckpoint, batch: int, steps: int,
               repeats: int) -> dict[str, Any]:
    import diffusers

    device = ckpt.diffusion.device
    pipe = diffusers.DDPMPipeline(unet=ref_unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    def theirs() -> None:
        pipe(batch_size=batch, num_inference_steps=steps, output_type="np",
             generator=torch.Generator(device=device).manual_seed(0))

    @torch.inference_mode()
    def ours() -> None:
        c = Chain(ckpt.diffusion, ImageNoise.for_images(0, range(batch), (3, 32, 32), device), steps=steps)
        while not c.done:
            x_t, t = c.model_input()
            c.step(ckpt.unet(x_t, t))
        to_uint8(c.x)

    # Interleaved (ours, theirs) pairs after a warm-up of each: load drift on a shared machine hits both alike.
    pairs = []
    for i in range(repeats + 1):
        pair = (timed(ours, device, 1, warmup=False), timed(theirs, device, 1, warmup=False))
        if i:
            pairs.append(pair)
    return {"batch": batch, "steps": steps, "ours_s": statistics.median(p[0] for p in pairs),
            "diffusers_s": statistics.median(p[1] for p in pairs),
            "ours_over_diffusers": statistics.median(p[0] / p[1] for p in pairs),
            "ratio_min": min(p[0] / p[1] for p in pairs), "ratio_max": max(p[0] / p[1] for p in pairs)}


# ---- report -------------------------------------------------------------------------------------------------------
def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else "" if v is None else str(v)
                                for v in row.values()) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cifar10", help="model preset for the overhead measurement")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per run")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip-diffusers", action="store_true", help="only the overhead measurement (a)")
    parser.add_argument("--skip-overhead", action="store_true", help="only the diffusers comparison (b)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    preset = model_preset(args.preset)
    torch.manual_seed(0)
    unet = UNet(preset.unet).to(device).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02)  # a fresh U-Net's zero output layer would make the chain trivially cheap
    diffusion = GaussianDiffusion.from_config(preset.diffusion, device=device)
    unet.cache_time_embeddings(diffusion.num_timesteps)
    overhead = [] if args.skip_overhead else [
        row for b in args.batches for row in overhead_rows(unet, diffusion, b, args.steps, args.repeats)]
    if overhead:
        print_table(f"(a) per-step cost of Chain.step vs the U-Net forward ({args.preset}, {device})", overhead)

    versus: list[dict[str, Any]] = []
    eps_diff = None
    if not args.skip_diffusers:
        with tempfile.TemporaryDirectory() as tmp:
            ref_unet, scheduler, ckpt = converted_cifar10(Path(tmp), device)
            eps_diff = max_eps_difference(ref_unet, ckpt, device)
            versus = [versus_row(ref_unet, scheduler, ckpt, b, args.steps, args.repeats) for b in args.batches]
        print_table(f"(b) ours vs diffusers DDPMPipeline, CIFAR10 U-Net, {args.steps} steps ({device}); "
                    f"max |eps diff| on the converted weights {eps_diff:.2g}", versus)

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"bench_sampler-{device.type}-{stamp}.json"
    path.write_text(json.dumps({
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "overhead": overhead, "versus_diffusers": versus, "max_eps_difference": eps_diff,
    }, indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
