"""Likelihood jobs in the worker: what one costs against the bare U-Net, and what it costs generation jobs that share
the worker with it. Side by side in one run, interleaved, on the worker's own engine and sink (``Engine`` +
``StoreSink``: progress and cancel checks in one Redis round-trip per tick, frames and results encoded and stored on
the background lanes) against a private real redis-server.

(a) **A likelihood job against T forwards** (per batch of B pictures in ``--batches``):

- *bare*: T calls of the prepared U-Net (``ServedModel.eps_fn``, the worker's precision) on B rows, t = T-1 .. 0;
- *served*: T calls of ``ServedModel.forward``, what the engine calls (on the CPU a lone row is padded to two:
  ``batch_invariant``);
- *job*: one likelihood job of B pictures from submission in Redis to ``succeeded`` with its result and preview
  frames stored (``BoundChain`` per tick: q-sample, the forward, the KL term, x0-hat).

``job_over_bare`` and ``job_over_served`` are the ratios of the medians (1.0: the job costs its forwards only).

(b) **Generation throughput with likelihood jobs sharing the worker**: ``--gen-jobs`` single-image generation jobs
of ``--gen-steps`` steps run *alone*, and *shared* with ``--lik-jobs`` single-picture likelihood jobs admitted at
the same moment (so every tick's forward carries both). Generation images/s is measured until the generation jobs
have all succeeded (the likelihood jobs, T ticks long, are then dropped). ``shared_over_alone`` is the ratio of
generation throughput; ``rows_alone`` / ``rows_shared`` are the rows per forward, whose ratio is what a forward
whose cost grows linearly with its rows (a CPU) predicts. On a GPU, where a forward of a few more rows costs
about the same, the ratio should stay near 1.

Model: the demo checkpoint (T = 1000) by default, or ``--preset`` with random weights. One JSON per run in
``$OUT`` when set, else ``benchmarks/results/``.

    .venv/bin/python benchmarks/bench_operations.py --batches 1 8 --gen-jobs 4 --gen-steps 100 --lik-jobs 1 \\
        --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import MODEL_PRESETS
from model.diffusion import GaussianDiffusion
from model.inference import InferenceOptions, default_options
from model.unet import UNet
from service.engine import Engine, JobSpec, ServedModel
from service.previews import Lanes
from service.queue import JobStore, connect
from service.redis_server import RedisServer
from service.worker import StoreSink

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "checkpoints" / "digits.safetensors"


def load(args: argparse.Namespace) -> tuple[ServedModel, str]:
    device = torch.device(args.device)
    options = default_options(device) if args.precision == "auto" else InferenceOptions(precision=args.precision)
    invariant = device.type == "cpu"  # as the worker
    if args.preset is None and DEMO.is_file():
        return ServedModel.load("digits", str(DEMO), device, batch_invariant=invariant, options=options), "demo"
    preset = MODEL_PRESETS[args.preset or "digits"]
    torch.manual_seed(0)
    unet = UNet(preset.unet).to(device)
    with torch.no_grad():  # zero-initialised output layers would make eps identically 0
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    diffusion = GaussianDiffusion.from_config(preset.diffusion, device=device)
    return ServedModel(args.preset or "digits", unet, diffusion, batch_invariant=invariant, options=options), \
        f"{args.preset} (random weights)"


def pictures(model: ServedModel, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, *model.shape), generator=g).float() / 127.5 - 1.0).to(model.device)


def created(store: JobStore, model: ServedModel, kind: str, request: dict[str, Any],
            inputs: torch.Tensor | None = None) -> JobSpec:
    """A job created and started in Redis as the worker finds it (its pictures handed over directly)."""
    request = {"model": model.name, "sampler": "ddpm", "eta": 0.0, **request}
    job_id = store.submit(request, model.name, num_images=request["num_images"], total_steps=request["steps"],
                          seeds=[request["seed"]] * request["num_images"], max_queue_length=100_000, kind=kind)
    store.start(job_id, "bench")
    return JobSpec.from_request(job_id, model.name, request, kind=kind, inputs=inputs)


def likelihood_job(store: JobStore, model: ServedModel, batch: int, seed: int) -> JobSpec:
    T = model.diffusion.num_timesteps
    request = {"num_images": batch, "seed": seed, "steps": T, "preview_every": max(1, T // 20), "rd_points": 20}
    return created(store, model, "likelihood", request, pictures(model, batch, seed))


def generation_job(store: JobStore, model: ServedModel, steps: int, seed: int) -> JobSpec:
    request = {"num_images": 1, "seed": seed, "steps": steps, "preview_every": max(1, steps // 20)}
    return created(store, model, "generate", request)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forwards(call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], model: ServedModel, batch: int) -> float:
    T = model.diffusion.num_timesteps
    x = torch.randn(batch, *model.shape, device=model.device)
    ts = [torch.full((batch,), t, dtype=torch.long, device=model.device) for t in range(T - 1, -1, -1)]

    def run() -> None:
        with torch.inference_mode():
            for t in ts:
                call(x, t)

    return timed(run)


def run_job(store: JobStore, model: ServedModel, spec: JobSpec) -> float:
    lanes = Lanes(threads=2)
    engine = Engine({model.name: model}, StoreSink(store, lanes))

    def go() -> None:
        engine.add(spec)
        while not engine.idle:
            engine.tick()
        lanes.close()  # the result and every frame stored

    seconds = timed(go)
    job = store.get(spec.job_id)
    assert job is not None and job["status"] == "succeeded" and store.result(spec.job_id) is not None, job
    return seconds


def part_a(store: JobStore, model: ServedModel, batches: list[int], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for batch in batches:
        run_job(store, model, likelihood_job(store, model, batch, 0))  # warm-up: allocator, kernel choice
        bare, served, job = [], [], []
        for r in range(repeats):
            bare.append(forwards(model.eps_fn, model, batch))
            served.append(forwards(model.forward, model, batch))
            job.append(run_job(store, model, likelihood_job(store, model, batch, r)))
        b, s, j = statistics.median(bare), statistics.median(served), statistics.median(job)
        rows.append({"batch": batch, "timesteps": model.diffusion.num_timesteps, "bare_s": b, "served_s": s,
                     "job_s": j, "job_over_bare": j / b, "job_over_served": j / s,
                     "bare_runs_s": bare, "served_runs_s": served, "job_runs_s": job})
        print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("_runs_s")}), flush=True)
    return rows


def mixed(store: JobStore, model: ServedModel, gen_jobs: int, gen_steps: int, lik_jobs: int, seed: int
          ) -> dict[str, float]:
    """Generation jobs (alone when ``lik_jobs`` is 0), all admitted at once; seconds until they all succeeded."""
    lanes = Lanes(threads=2)
    engine = Engine({model.name: model}, StoreSink(store, lanes))
    liks = [likelihood_job(store, model, 1, seed + i) for i in range(lik_jobs)]
    gens = [generation_job(store, model, gen_steps, seed + i) for i in range(gen_jobs)]
    rows, ticks = 0, 0
    start = time.perf_counter()
    for spec in [*liks, *gens]:
        engine.add(spec)
    waiting = {s.job_id for s in gens}
    while waiting & set(engine.job_ids):
        rows += engine.tick().images
        ticks += 1
    for spec in gens:
        lanes.drain(spec.job_id)
    seconds = time.perf_counter() - start
    for spec in liks:
        engine.remove(spec.job_id)
    lanes.close()
    for spec in gens:
        assert (store.get(spec.job_id) or {}).get("status") == "succeeded"
    return {"seconds": seconds, "images_per_s": gen_jobs / seconds, "rows_per_tick": rows / ticks, "ticks": ticks}


def part_b(store: JobStore, model: ServedModel, gen_jobs: int, gen_steps: int, lik_jobs: int, repeats: int
           ) -> dict[str, Any]:
    mixed(store, model, gen_jobs, gen_steps, lik_jobs, 999)  # warm-up of both batch sizes
    mixed(store, model, gen_jobs, gen_steps, 0, 999)
    alone, shared = [], []
    for r in range(repeats):  # interleaved, so a shared machine's load falls on both alike
        alone.append(mixed(store, model, gen_jobs, gen_steps, 0, 100 * r))
        shared.append(mixed(store, model, gen_jobs, gen_steps, lik_jobs, 100 * r))
    a = statistics.median(x["images_per_s"] for x in alone)
    s = statistics.median(x["images_per_s"] for x in shared)
    ratios = [y["images_per_s"] / x["images_per_s"] for x, y in zip(alone, shared, strict=True)]
    out = {"gen_jobs": gen_jobs, "gen_steps": gen_steps, "lik_jobs": lik_jobs, "alone_img_s": a, "shared_img_s": s,
           "shared_over_alone": s / a, "ratio_min": min(ratios), "ratio_max": max(ratios),
           "rows_alone": alone[0]["rows_per_tick"], "rows_shared": shared[0]["rows_per_tick"],
           "linear_prediction": alone[0]["rows_per_tick"] / shared[0]["rows_per_tick"],
           "alone_runs": alone, "shared_runs": shared}
    print(json.dumps({k: v for k, v in out.items() if not k.endswith("_runs")}), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(MODEL_PRESETS), default=None,
                        help="random-weight preset instead of the demo checkpoint")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="pictures per likelihood job, (a)")
    parser.add_argument("--gen-jobs", type=int, default=4, help="single-image generation jobs, (b)")
    parser.add_argument("--gen-steps", type=int, default=100)
    parser.add_argument("--lik-jobs", type=int, default=1, help="single-picture likelihood jobs sharing, (b)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="the worker's U-Net precision (auto: the worker's default for the device)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--skip-a", action="store_true")
    parser.add_argument("--skip-b", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, what = load(args)
    model.warm_up()
    with RedisServer() as server:
        store = JobStore(connect(server.url, timeout=5.0))
        rows = [] if args.skip_a else part_a(store, model, args.batches, args.repeats)
        sharing = None if args.skip_b else part_b(store, model, args.gen_jobs, args.gen_steps, args.lik_jobs,
                                                  args.repeats)
        store.redis.close()
    device = model.device
    report = {"script": "bench_operations", "model": what, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
              platform.processor() or platform.machine(),
              "precision": model.options.precision, "batch_invariant": model.batch_invariant,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": args.repeats,
              "likelihood_vs_forwards": rows, "sharing": sharing}
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"bench_operations-{device.type}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{what}, {device}, {model.options.describe()}, {torch.get_num_threads()} thread(s), median of "
          f"{args.repeats}; raw: {out}\n")
    if rows:
        print("| pictures | T | bare forwards s | served forwards s | likelihood job s | job / bare | job / served |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['batch']} | {r['timesteps']} | {r['bare_s']:.2f} | {r['served_s']:.2f} | {r['job_s']:.2f} "
                  f"| {r['job_over_bare']:.3f} | {r['job_over_served']:.3f} |")
    if sharing:
        s = sharing
        print(f"\n{s['gen_jobs']} generation jobs x {s['gen_steps']} steps, alone vs with {s['lik_jobs']} likelihood "
              f"job(s): {s['alone_img_s']:.3g} vs {s['shared_img_s']:.3g} images/s, shared/alone "
              f"{s['shared_over_alone']:.3f} ({s['ratio_min']:.3f}-{s['ratio_max']:.3f}); rows per forward "
              f"{s['rows_alone']:.1f} vs {s['rows_shared']:.1f} (linear prediction {s['linear_prediction']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
