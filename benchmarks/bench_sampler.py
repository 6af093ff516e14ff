"""Sampler benchmarks, measured side by side in one run and reported as cost ratios.

(a) Per-step overhead: the time of our ``Chain.step`` (schedule look-ups, per-image noise, the update, x0-hat)
    against the bare U-Net forward it wraps, for a model preset, per batch size and sampler.
(b) Our U-Net + sampler against diffusers' ``DDPMPipeline`` on the same weights: a random-init diffusers
    ``UNet2DModel`` in the paper's CIFAR10 layout (35.7M parameters) is saved, converted with our importer
    (``model.convert``), and both sample the same number of steps and images in interleaved rounds;
    ``ours_over_diffusers`` = our time / diffusers' time (below 1: ours is faster).

Prints tables and writes JSON to ``benchmarks/results/``. diffusers is a benchmark/test-only dependency.

    .venv/bin/python -m benchmarks.bench_sampler --steps 20 --batches 1 16 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Run, add_out_argument, compare, interleaved, markdown_table, set_threads, timer
from benchmarks.models import diffusers_config_from_unet, random_model
from model.checkpoint import LoadedCheckpoint, load_checkpoint
from model.config import model_preset
from model.convert import import_diffusers
from model.diffusion import GaussianDiffusion
from model.images import to_uint8
from model.sampler import Chain, ImageNoise
from model.unet import UNet

log = logging.getLogger("bench_sampler")


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up run."""
    return statistics.median(interleaved({"fn": timer(fn, device)}, repeats)["fn"])


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

    fwd = median_seconds(forwards_only, device, repeats) / steps
    tot = median_seconds(full, device, repeats) / steps
    rows = []
    for sampler, want_x0 in VARIANTS:
        stp = median_seconds(steps_only(sampler, want_x0), device, max(repeats, 5)) / steps
        rows.append({"batch": batch, "sampler": sampler, "x0_hat": want_x0, "forward_ms": 1e3 * fwd,
                     "step_ms": 1e3 * stp, "step_share_pct": 100 * stp / (fwd + stp),
                     "loop_ms": 1e3 * tot if (sampler, want_x0) == VARIANTS[0] else None})
    return rows


def overhead(preset: str, device: torch.device, batches: Sequence[int], steps: int, repeats: int
             ) -> list[dict[str, Any]]:
    unet, diffusion = random_model(preset, device)
    unet.cache_time_embeddings(diffusion.num_timesteps)
    return [row for b in batches for row in overhead_rows(unet, diffusion, b, steps, repeats)]


# ---- (b) ours vs diffusers ----------------------------------------------------------------------------------------
def converted_cifar10(folder: Path, device: torch.device) -> tuple[Any, Any, LoadedCheckpoint]:
    """A random-init diffusers CIFAR10 UNet2DModel + DDPMScheduler, and the same weights through our importer."""
    import diffusers

    torch.manual_seed(0)
    unet: Any = diffusers.UNet2DModel(**diffusers_config_from_unet(model_preset("cifar10").unet))
    unet.eval()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                        variance_type="fixed_large", clip_sample=True)
    pipeline: Any = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipeline.save_pretrained(folder / "ddpm-cifar10-random")
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
    pipe: Any = diffusers.DDPMPipeline(unet=ref_unet, scheduler=scheduler)
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

    t = interleaved({"ours": timer(ours, device), "diffusers": timer(theirs, device)}, repeats)
    return {"batch": batch, "steps": steps, "ours_s": statistics.median(t["ours"]),
            "diffusers_s": statistics.median(t["diffusers"]),
            **compare(t["ours"], t["diffusers"], "ours_over_diffusers"), "ours_runs_s": t["ours"],
            "diffusers_runs_s": t["diffusers"]}


def versus_diffusers(device: torch.device, batches: Sequence[int], steps: int, repeats: int
                     ) -> tuple[float, list[dict[str, Any]]]:
    """The max |eps difference| on the converted weights, and one row per batch size."""
    with tempfile.TemporaryDirectory() as tmp:
        ref_unet, scheduler, ckpt = converted_cifar10(Path(tmp), device)
        eps_diff = max_eps_difference(ref_unet, ckpt, device)
        return eps_diff, [versus_row(ref_unet, scheduler, ckpt, b, steps, repeats) for b in batches]


# ---- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--preset", default="cifar10", help="model preset for the overhead measurement")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per run")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (rounds) per measurement (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip-diffusers", action="store_true", help="only the overhead measurement (a)")
    parser.add_argument("--skip-overhead", action="store_true", help="only the diffusers comparison (b)")
    add_out_argument(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run("bench_sampler", args, args.device, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_threads(args.threads)
    device = torch.device(args.device)
    report: dict[str, Any] = {"preset": args.preset, "steps": args.steps, "overhead": [], "versus_diffusers": [],
                              "max_eps_difference": None}

    if not args.skip_overhead:
        report["overhead"] = rows = overhead(args.preset, device, args.batches, args.steps, args.repeats)
        print(f"\n(a) per-step cost of Chain.step vs the U-Net forward ({args.preset}, {device})")
        print(markdown_table(list(rows[0]), [list(r.values()) for r in rows]))

    if not args.skip_diffusers:
        eps_diff, rows = versus_diffusers(device, args.batches, args.steps, args.repeats)
        report["max_eps_difference"], report["versus_diffusers"] = eps_diff, rows
        print(f"\n(b) ours vs diffusers DDPMPipeline, CIFAR10 U-Net, {args.steps} steps ({device}); "
              f"max |eps diff| on the converted weights {eps_diff:.2g}")
        print(markdown_table(["batch", "steps", "ours_s", "diffusers_s", "ours / diffusers (min-max)"],
                             [[r["batch"], r["steps"], r["ours_s"], r["diffusers_s"],
                               f"{r['ours_over_diffusers']:.3g} ({r['ours_over_diffusers_min']:.3g}-"
                               f"{r['ours_over_diffusers_max']:.3g})"] for r in rows]))

    print(f"\nwrote {run.write(report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
