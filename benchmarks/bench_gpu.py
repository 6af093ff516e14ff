"""The fast inference path on one device: U-Net images/s per batch and option, the engine with concurrent jobs,
and (``--quality``) how far each option's final images are from fp32's.

1. **U-Net** (``unet`` rows): for every setting (``--settings``, e.g. ``fp32``, ``bf16+cl``,
   ``bf16+cl+compile+graphs``; ``cl`` = channels_last) and batch (``--batches``), ``--warmup`` forwards, then
   ``--timed-steps`` forwards timed between device syncs. Reported: ms per step and images/s of a
   1000-step sample, ``batch / (1000 * step_s)``.
2. **Engine** (``engine`` rows): N single-image jobs (``--engine-jobs``), all admitted at once into the worker's
   ``Engine`` (one forward per tick over N images, each job's own chain and noise streams, a frame at its last
   step copied to the host as the worker's sink does), ``--engine-steps`` steps, no Redis. images/s at 1000
   steps = ``N / (1000 * tick_s)``; ``outside_pct`` compares the tick with the bare U-Net step at the same batch
   and setting from part 1 (the sampler, packing and per-image noise draws).
3. **Quality** (``--quality``): ``--quality-images`` images of ``--quality-steps`` ancestral steps, same seeds,
   with each setting against fp32 eager: max and mean |difference| of the final images in [-1, 1] and in
   uint8 levels, and the share of pixels more than one level apart.

Models have random weights (small, so eps is not the zero-init's 0) unless ``--checkpoint`` names trained
ones. The paper's bar: 256 CIFAR10 images in 17 s on a TPU v3-8, about 15 images/s at 1000 steps. Results:
a table on stdout and JSON in ``$OUT`` if set, else ``benchmarks/results/``. A setting that fails (e.g. compile
unavailable) is recorded with its error and the run goes on; ``--budget-s`` skips what is left once the run is
that old. No ratios are computed here: images/s are throughputs, ``outside_pct`` a share.

    .venv/bin/python -m benchmarks.bench_gpu                  # one GPU: the full run (~8 min budget)
    .venv/bin/python -m benchmarks.bench_gpu --quality-only   # the quality comparison alone, 1000 steps
    .venv/bin/python -m benchmarks.bench_gpu --quick          # CPU sanity run, tiny settings (~1 min)
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Run, add_out_argument, cpu_model, set_threads, sync
from benchmarks.models import random_model
from model.config import MODEL_PRESETS
from model.images import to_uint8
from model.inference import InferenceOptions
from model.sampler import sample
from service.engine import Engine, JobSpec, Measurement, ServedModel, StepProgress

PAPER_IMAGES_PER_S = 256 / 17  # TPU v3-8, 1000 steps (Ho et al. 2020, Section 4)
GPU_SETTINGS = ["fp32", "fp32+graphs", "bf16+cl", "bf16+cl+graphs", "bf16+cl+compile", "bf16+cl+compile+graphs"]
CPU_SETTINGS = ["fp32", "fp32+cl", "bf16", "bf16+cl"]
log = logging.getLogger("bench_gpu")


def parse_setting(label: str, max_batch: int, compile_mode: str | None) -> InferenceOptions:
    """``bf16+cl+compile+graphs`` -> InferenceOptions."""
    precision, *flags = label.split("+")
    known = {"cl": "channels_last", "compile": "compile", "graphs": "cuda_graphs"}
    unknown = set(flags) - set(known)
    if unknown:
        raise SystemExit(f"unknown flag(s) {sorted(unknown)} in setting {label!r}; use {sorted(known)}")
    return InferenceOptions(precision=precision, compile_mode=compile_mode,  # type: ignore[arg-type]
                            max_batch_size=max_batch, **{known[f]: True for f in flags})


def build(preset: str, device: torch.device, options: InferenceOptions, batch_invariant: bool,
          checkpoint: str | None = None) -> ServedModel:
    """A fresh model prepared with ``options``: ``checkpoint``'s weights, else random ones of ``preset`` (the same
    weights every time)."""
    if checkpoint:
        return ServedModel.load(Path(checkpoint).stem, checkpoint, device, batch_invariant=batch_invariant,
                                options=options)
    unet, diffusion = random_model(preset, device)
    return ServedModel(preset, unet, diffusion, batch_invariant=batch_invariant, options=options)


def time_unet(model: ServedModel, batch: int, warmup: int, steps: int) -> float:
    """Seconds per forward of ``batch`` images (the worker's padding applies, as in serving)."""
    x = torch.randn(batch, *model.shape, device=model.device)
    t = torch.randint(0, model.diffusion.num_timesteps, (batch,), device=model.device)
    for _ in range(warmup):
        model.forward(x, t)
    sync(model.device)
    start = time.perf_counter()
    for _ in range(steps):
        model.forward(x, t)
    sync(model.device)
    return (time.perf_counter() - start) / steps


class HostCopySink:
    """The worker sink's device work only: frames and final images copied to the host; nothing stored."""

    def sync(self, progress: Sequence[StepProgress], active: Sequence[str]) -> set[str]:
        return set()

    def frame(self, job_id: str, step: int, t: int, x0_hat: torch.Tensor) -> None:
        x0_hat.cpu()

    def succeeded(self, job_id: str, images: torch.Tensor, last: StepProgress) -> None:
        images.cpu()

    def measured(self, job_id: str, measurement: Measurement, last: StepProgress) -> None: ...

    def canceled(self, job_id: str) -> None: ...

    def failed(self, job_id: str, code: str, message: str) -> None:
        raise RuntimeError(f"{job_id} failed: {code}: {message}")

    def handed_back(self, job_id: str, reason: str) -> None: ...


def time_engine(model: ServedModel, jobs: int, steps: int) -> float:
    """Seconds per tick with ``jobs`` single-image jobs of ``steps`` steps sharing every forward."""
    engine = Engine({model.name: model}, HostCopySink(), max_batch_size=max(jobs, 1))
    for i in range(jobs):
        engine.add(JobSpec(job_id=f"job{i}", model=model.name, num_images=1, seed=i, steps=steps))
    engine.tick()  # first tick apart (the forward of this batch size may not be warm)
    sync(model.device)
    start = time.perf_counter()
    ticks = 0
    while not engine.idle:
        engine.tick()
        ticks += 1
    sync(model.device)
    return (time.perf_counter() - start) / ticks


def quality(preset: str, device: torch.device, settings: Sequence[str], images: int, steps: int, max_batch: int,
            compile_mode: str | None, checkpoint: str | None = None) -> list[dict[str, Any]]:
    """Final images of each setting vs fp32 eager, same seeds and noise."""
    def final(label: str) -> torch.Tensor:
        model = build(preset, device, parse_setting(label, max_batch, compile_mode), batch_invariant=False,
                      checkpoint=checkpoint)
        return sample(model.forward, model.diffusion, images, model.shape, seed=0, steps=steps).float().cpu()

    ref = final("fp32")
    ref8 = torch.from_numpy(to_uint8(ref)).int()
    rows: list[dict[str, Any]] = []
    for label in settings:
        if label == "fp32":
            continue
        try:
            x = final(label)
        except Exception as exc:  # a setting this machine cannot run: recorded, not fatal
            rows.append({"setting": label, "error": f"{type(exc).__name__}: {exc}"})
            continue
        d, d8 = (x - ref).abs(), (torch.from_numpy(to_uint8(x)).int() - ref8).abs()
        rows.append({"setting": label, "images": images, "steps": steps, "max_abs": d.max().item(),
                     "mean_abs": d.mean().item(), "max_levels": int(d8.max()), "mean_levels": d8.float().mean().item(),
                     "pct_over_1_level": 100 * (d8 > 1).float().mean().item()})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def guarded(rows: list[dict[str, Any]], row: dict[str, Any], fn: Callable[[], dict[str, Any]],
            deadline: float) -> None:
    """Run one measurement into ``rows``: skipped past the deadline, its error recorded if it fails."""
    if time.monotonic() > deadline:
        rows.append({**row, "skipped": "time budget"})
        return
    try:
        row.update(fn())
    except Exception as exc:
        log.warning("%s failed: %s", row, exc)
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    rows.append(row)
    print(json.dumps(rows[-1]), flush=True)


def run_setting(args: argparse.Namespace, device: torch.device, label: str, deadline: float,
                unet_rows: list[dict[str, Any]], engine_rows: list[dict[str, Any]]) -> None:
    max_batch = max(args.batches + args.engine_jobs)
    try:
        model = build(args.preset, device, parse_setting(label, max_batch, args.compile_mode),
                      batch_invariant=device.type == "cpu", checkpoint=args.checkpoint)
    except Exception as exc:
        unet_rows.append({"setting": label, "error": f"{type(exc).__name__}: {exc}"[:300]})
        return
    for b in args.batches:
        def unet(b: int = b) -> dict[str, Any]:
            step_s = time_unet(model, b, args.warmup, args.timed_steps)
            return {"step_ms": 1000 * step_s, "images_per_s_1000": b / (1000 * step_s)}
        guarded(unet_rows, {"setting": label, "batch": b}, unet, deadline)
    if label not in args.engine_settings:
        return
    for n in args.engine_jobs:
        def eng(n: int = n) -> dict[str, Any]:
            tick_s = time_engine(model, n, args.engine_steps)
            bare = next((r for r in unet_rows if r["setting"] == label and r.get("batch") == n and "step_ms" in r),
                        None)
            out = {"tick_ms": 1000 * tick_s, "images_per_s_1000": n / (1000 * tick_s)}
            if bare:
                out["outside_pct"] = 100 * (1 - bare["step_ms"] / out["tick_ms"])
            return out
        guarded(engine_rows, {"setting": label, "jobs": n}, eng, deadline)


def print_unet_table(report: dict[str, Any], batches: list[int]) -> None:
    print("| U-Net | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for label in report["settings"]:
        cells = []
        for b in batches:
            r: dict[str, Any] = next((r for r in report["unet"] if r["setting"] == label and r.get("batch") == b),
                                     {})
            cells.append(f"{r['images_per_s_1000']:.3g}" if "images_per_s_1000" in r
                         else r.get("skipped") or ("error" if "error" in r else "-"))
        print(f"| {label} | " + " | ".join(cells) + " |")


def print_tables(report: dict[str, Any]) -> None:
    model = report["checkpoint"] or f"{report['preset']} preset"
    print(f"\n{model}, {report['device_name']}, timed {report['timed_steps']} steps; images/s "
          f"at 1000 steps (the paper: {PAPER_IMAGES_PER_S:.1f} images/s on a TPU v3-8)\n")
    batches = report["batches"] if report["unet"] else []
    if batches:
        print_unet_table(report, batches)
    if report["engine"]:
        print("\n| engine, N single-image jobs | N | images/s at 1000 steps | tick ms | outside U-Net % |")
        print("|---|---|---|---|---|")
        for r in report["engine"]:
            if "tick_ms" in r:
                print(f"| {r['setting']} | {r['jobs']} | {r['images_per_s_1000']:.3g} | {r['tick_ms']:.2f} "
                      f"| {r.get('outside_pct', float('nan')):.1f} |")
            else:
                print(f"| {r['setting']} | {r['jobs']} | {r.get('skipped') or r.get('error')} | | |")
    for r in report.get("quality", []):
        if "error" in r:
            print(f"\nquality {r['setting']}: {r['error']}")
        else:
            print(f"\nquality {r['setting']} vs fp32 ({r['images']} images, {r['steps']} steps): max |d| "
                  f"{r['max_abs']:.3g}, mean |d| {r['mean_abs']:.3g} in [-1, 1]; uint8 levels max {r['max_levels']}, "
                  f"mean {r['mean_levels']:.3f}, {r['pct_over_1_level']:.2f}% of pixels > 1 level apart")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="cifar10", choices=sorted(MODEL_PRESETS))
    ap.add_argument("--checkpoint", help="a trained checkpoint instead of random weights of --preset")
    ap.add_argument("--settings", nargs="+", help=f"default: {GPU_SETTINGS} on CUDA, {CPU_SETTINGS} on the CPU")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256, 512])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timed-steps", type=int, default=20)
    ap.add_argument("--engine-jobs", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--engine-settings", nargs="+", help="settings also run through the engine "
                                                         "(default: the first and the last of --settings)")
    ap.add_argument("--engine-steps", type=int, default=20)
    ap.add_argument("--quality", action="store_true", help="also compare final images with fp32's")
    ap.add_argument("--quality-only", action="store_true", help="only the quality comparison")
    ap.add_argument("--quality-settings", nargs="+",
                    help="default: --settings without the compiled ones (each would compile again)")
    ap.add_argument("--quality-images", type=int, default=16)
    ap.add_argument("--quality-steps", type=int, default=1000)
    ap.add_argument("--compile-mode", default=None, help='torch.compile mode, e.g. "max-autotune-no-cudagraphs"')
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip timings left after this many seconds")
    ap.add_argument("--quick", action="store_true", help="tiny settings for a CPU sanity run")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.batches, args.warmup, args.timed_steps = "tiny", [1, 4], 2, 5
        args.engine_jobs, args.engine_steps, args.quality_images, args.quality_steps = [1, 4], 3, 4, 10
    if args.settings is None:
        args.settings = GPU_SETTINGS if args.device.startswith("cuda") else CPU_SETTINGS
    if args.quality_settings is None:
        args.quality_settings = [s for s in args.settings if "compile" not in s.split("+")]
    if args.engine_settings is None:
        args.engine_settings = sorted({args.settings[0], args.settings[-1]}, key=args.settings.index)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run("bench_gpu", args, args.device, argv)
    logging.basicConfig(level=logging.WARNING)
    set_threads(args.threads)
    device = torch.device(args.device)
    deadline = time.monotonic() + args.budget_s
    report: dict[str, Any] = {
        "preset": args.preset, "checkpoint": args.checkpoint, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "settings": args.settings, "batches": args.batches, "timed_steps": args.timed_steps, "warmup": args.warmup,
        "engine_steps": args.engine_steps, "paper_images_per_s": PAPER_IMAGES_PER_S,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32, "unet": [], "engine": []}

    if not args.quality_only:
        for label in args.settings:
            run_setting(args, device, label, deadline, report["unet"], report["engine"])
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the previous setting's model and graphs are gone
    if args.quality or args.quality_only:
        report["quality"] = quality(args.preset, device, args.quality_settings, args.quality_images, args.quality_steps,
                                    max(args.batches), args.compile_mode, args.checkpoint)

    out = run.write(report)
    print_tables(report)
    print(f"\nraw: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
