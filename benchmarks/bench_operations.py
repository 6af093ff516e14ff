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

``job_over_bare`` and ``job_over_served`` are cost ratios (the median of the per-round ratios, with min and max;
1.0: the job costs its forwards only).

(b) **Generation throughput with likelihood jobs sharing the worker**: ``--gen-jobs`` single-image generation jobs
of ``--gen-steps`` steps run *alone*, and *shared* with ``--lik-jobs`` single-picture likelihood jobs admitted at
the same moment (so every tick's forward carries both). Generation images/s is measured until the generation jobs
have all succeeded (the likelihood jobs, T ticks long, are then dropped). ``shared_over_alone`` is the cost
ratio of the generation jobs' wall time shared / alone (above 1: the likelihood rows slow them); ``rows_alone`` and
``rows_shared`` are the rows per forward, and ``linear_prediction`` = rows_shared / rows_alone is what a forward
whose cost grows linearly with its rows (a CPU) predicts. On a GPU, where a forward of a few more rows costs about
the same, the ratio should stay near 1.

Model: the demo checkpoint (T = 1000) by default, or ``--preset`` with random weights. One JSON per run in
``benchmarks/results/`` (``benchmarks.common.Run``).

    .venv/bin/python -m benchmarks.bench_operations --batches 1 8 --gen-jobs 4 --gen-steps 100 --lik-jobs 1 \\
        --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks.common import Run, add_out_argument, compare, interleaved, markdown_table, set_threads, timer
from benchmarks.models import DEMO_CHECKPOINT, random_model
from model.config import MODEL_PRESETS
from model.inference import InferenceOptions, default_options
from service.engine import Engine, JobSpec, ServedModel
from service.lanes import Lanes
from service.queue import JobStore, connect
from service.redis_server import RedisServer
from service.store_sink import StoreSink


def load(args: argparse.Namespace) -> tuple[ServedModel, str]:
    """The model as the worker serves it: the demo checkpoint, or a preset with random weights."""
    device = torch.device(args.device)
    options = default_options(device) if args.precision == "auto" else InferenceOptions(precision=args.precision)
    invariant = device.type == "cpu"  # as the worker
    if args.preset is None and DEMO_CHECKPOINT.is_file():
        return ServedModel.load("digits", str(DEMO_CHECKPOINT), device, batch_invariant=invariant,
                                options=options), "demo checkpoint (digits)"
    unet, diffusion = random_model(args.preset or "digits", device)
    return ServedModel(args.preset or "digits", unet, diffusion, batch_invariant=invariant, options=options), \
        f"{args.preset or 'digits'} (random weights)"


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


def forwards(call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], model: ServedModel, batch: int
             ) -> Callable[[], None]:
    """T calls of ``call`` on ``batch`` rows, t = T-1 .. 0."""
    T = model.diffusion.num_timesteps
    x = torch.randn(batch, *model.shape, device=model.device)
    ts = [torch.full((batch,), t, dtype=torch.long, device=model.device) for t in range(T - 1, -1, -1)]

    def run() -> None:
        with torch.inference_mode():
            for t in ts:
                call(x, t)

    return run


def job_run(store: JobStore, model: ServedModel, batch: int) -> Callable[[], None]:
    """A fresh likelihood job of ``batch`` pictures each call, run by the worker's engine and sink to its end."""
    seeds = iter(range(10**6))

    def run() -> None:
        spec = likelihood_job(store, model, batch, next(seeds))
        lanes = Lanes(threads=2)
        engine = Engine({model.name: model}, StoreSink(store, lanes))
        engine.add(spec)
        while not engine.idle:
            engine.tick()
        lanes.close()  # the result and every frame stored
        job = store.get(spec.job_id)
        assert job is not None and job["status"] == "succeeded" and store.result(spec.job_id) is not None, job

    return run


def part_a(store: JobStore, model: ServedModel, batches: list[int], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for batch in batches:
        dev = model.device
        t = interleaved({"bare": timer(forwards(model.eps_fn, model, batch), dev),
                         "served": timer(forwards(model.forward, model, batch), dev),
                         "job": timer(job_run(store, model, batch), dev)}, repeats)
        rows.append({"batch": batch, "timesteps": model.diffusion.num_timesteps,
                     "bare_s": statistics.median(t["bare"]), "served_s": statistics.median(t["served"]),
                     "job_s": statistics.median(t["job"]), **compare(t["job"], t["bare"], "job_over_bare"),
                     **compare(t["job"], t["served"], "job_over_served"),
                     "bare_runs_s": t["bare"], "served_runs_s": t["served"], "job_runs_s": t["job"]})
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
    rounds = iter(range(10**6))
    runs = interleaved({"alone": lambda: mixed(store, model, gen_jobs, gen_steps, 0, 100 * next(rounds)),
                        "shared": lambda: mixed(store, model, gen_jobs, gen_steps, lik_jobs, 100 * next(rounds))},
                       repeats, warmup=0)  # warmed up above; interleaved, so load falls on both alike
    alone, shared = runs["alone"], runs["shared"]
    out = {"gen_jobs": gen_jobs, "gen_steps": gen_steps, "lik_jobs": lik_jobs,
           "alone_img_s": statistics.median(x["images_per_s"] for x in alone),
           "shared_img_s": statistics.median(x["images_per_s"] for x in shared),
           **compare([x["seconds"] for x in shared], [x["seconds"] for x in alone], "shared_over_alone"),
           "rows_alone": alone[0]["rows_per_tick"], "rows_shared": shared[0]["rows_per_tick"],
           "linear_prediction": shared[0]["rows_per_tick"] / alone[0]["rows_per_tick"],
           "alone_runs": alone, "shared_runs": shared}
    print(json.dumps({k: v for k, v in out.items() if not k.endswith("_runs")}), flush=True)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
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
    add_out_argument(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run("bench_operations", args, args.device, argv)
    logging.basicConfig(level=logging.WARNING)
    set_threads(args.threads)
    model, what = load(args)
    model.eps_fn.warm_up()
    with RedisServer() as server:
        store = JobStore(connect(server.url, timeout=5.0))
        rows = [] if args.skip_a else part_a(store, model, args.batches, args.repeats)
        sharing = None if args.skip_b else part_b(store, model, args.gen_jobs, args.gen_steps, args.lik_jobs,
                                                  args.repeats)
        store.redis.close()
    report = {"model": what, "device": str(model.device), "precision": model.options.precision,
              "batch_invariant": model.batch_invariant, "repeats": args.repeats,
              "likelihood_vs_forwards": rows, "sharing": sharing}
    print(f"\n{what}, {model.device}, {model.options.describe()}, {torch.get_num_threads()} thread(s), "
          f"{args.repeats} rounds; raw: {run.write(report)}\n")
    if rows:
        print(markdown_table(["pictures", "T", "bare forwards s", "served forwards s", "likelihood job s",
                              "job / bare", "job / served"],
                             [[r["batch"], r["timesteps"], r["bare_s"], r["served_s"], r["job_s"],
                               r["job_over_bare"], r["job_over_served"]] for r in rows]))
    if sharing:
        s = sharing
        print(f"\n{s['gen_jobs']} generation jobs x {s['gen_steps']} steps, alone vs with {s['lik_jobs']} likelihood "
              f"job(s): {s['alone_img_s']:.3g} vs {s['shared_img_s']:.3g} images/s; time shared / alone "
              f"{s['shared_over_alone']:.3f} ({s['shared_over_alone_min']:.3f}-{s['shared_over_alone_max']:.3f}); "
              f"rows per forward {s['rows_alone']:.1f} vs {s['rows_shared']:.1f} (linear prediction "
              f"{s['linear_prediction']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
