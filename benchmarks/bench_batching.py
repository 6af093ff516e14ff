"""Continuous batching in the worker: N concurrent single-image jobs against the same jobs one after another.

For N in ``--jobs`` (default 1, 4, 16) the worker's ``Engine`` runs N single-image jobs (different seeds) with
the worker's real sink (``StoreSink``: progress and cancel checks in one Redis round-trip per step, frames and
final PNGs encoded and stored on the background lanes) against a private real redis-server:

- *sequential*: one job at a time, each to the end (what a worker without batching does);
- *concurrent*: all N admitted at once, so each step is one U-Net forward over N images.

The two run in interleaved rounds and the best round of each is kept (a shared, noisy machine). Reported per N:
wall seconds and aggregate images/s of both, ``concurrent_over_sequential`` = concurrent / sequential seconds
(below 1: batching is faster), the same ratio over the U-Net forwards alone (the floor batching can reach), and
``outside_pct``: the share of each denoising step (the engine's tick: pack inputs, forward, split, per-job
updates, the Redis round-trip, handing frames to the lanes) spent outside the U-Net forward. Also the cost of
``batch_invariant`` (a lone image padded to two rows): ``padded_over_alone``.

The models have random weights (timing only). Raw figures go to ``benchmarks/results/`` as JSON.

    .venv/bin/python -m benchmarks.bench_batching --preset cifar10 --steps 5 --jobs 1 4 16 --threads 1 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks.common import Run, add_out_argument, interleaved, markdown_table, set_threads
from benchmarks.models import random_model
from model.config import MODEL_PRESETS
from service.engine import Engine, JobSpec, ServedModel, TickStats
from service.lanes import Lanes
from service.queue import JobStore, connect
from service.redis_server import RedisServer
from service.store_sink import StoreSink


def build_model(preset: str, device: str, batch_invariant: bool) -> ServedModel:
    unet, diffusion = random_model(preset, device)
    return ServedModel(preset, unet, diffusion, batch_invariant=batch_invariant)


def submit(store: JobStore, model: ServedModel, n: int, steps: int) -> list[JobSpec]:
    """N single-image jobs (seeds 0 .. N-1), created and started in Redis as a worker would find them."""
    specs = []
    for seed in range(n):
        req: dict[str, Any] = {"num_images": 1, "seed": seed, "steps": steps, "sampler": "ddpm", "eta": 0.0,
                               "variance": "fixedlarge", "preview_every": max(1, steps // 4), "model": model.name}
        job_id = store.submit(req, model.name, num_images=1, total_steps=steps, seeds=[seed],
                              max_queue_length=10_000)
        store.start(job_id, "bench")
        specs.append(JobSpec.from_request(job_id, model.name, req))
    return specs


def run_jobs(model: ServedModel, store: JobStore, specs: list[JobSpec], concurrent: bool, max_batch: int
        ) -> tuple[float, list[TickStats]]:
    """Seconds from the first job's admission to the last image stored, and the engine's ticks."""
    lanes = Lanes(threads=2)
    engine = Engine({model.name: model}, StoreSink(store, lanes), max_batch_size=max_batch,
                    sync_forward=model.device.type == "cuda")  # time the forward itself, not its launch
    ticks: list[TickStats] = []
    start = time.perf_counter()
    for group in ([specs] if concurrent else [[s] for s in specs]):
        for spec in group:
            engine.add(spec)
        while not engine.idle:
            ticks.append(engine.tick())
    lanes.close()  # every frame and final image stored
    seconds = time.perf_counter() - start
    for spec in specs:
        assert store.get(spec.job_id)["status"] == "succeeded"  # type: ignore[index]
    return seconds, ticks


def row(model: ServedModel, store: JobStore, n: int, steps: int, repeats: int, max_batch: int) -> dict[str, Any]:
    """N jobs both ways, ``repeats`` interleaved rounds, the best round of each side."""
    def side(concurrent: bool) -> Callable[[], tuple[float, list[TickStats]]]:
        return lambda: run_jobs(model, store, submit(store, model, n, steps), concurrent, max_batch)

    rounds = interleaved({"sequential": side(False), "concurrent": side(True)}, repeats, warmup=0)
    seq_s, seq_ticks = min(rounds["sequential"], key=lambda r: r[0])
    conc_s, conc_ticks = min(rounds["concurrent"], key=lambda r: r[0])
    fwd_seq, fwd_conc = sum(t.forward_s for t in seq_ticks), sum(t.forward_s for t in conc_ticks)
    tick_seq, tick_conc = sum(t.total_s for t in seq_ticks), sum(t.total_s for t in conc_ticks)
    return {"jobs": n, "steps": steps, "sequential_s": seq_s, "concurrent_s": conc_s,
            "sequential_img_s": n / seq_s, "concurrent_img_s": n / conc_s,
            "concurrent_over_sequential": conc_s / seq_s, "unet_concurrent_over_sequential": fwd_conc / fwd_seq,
            "outside_pct_sequential": 100 * (tick_seq - fwd_seq) / tick_seq,
            "outside_pct_concurrent": 100 * (tick_conc - fwd_conc) / tick_conc,
            "mean_batch": sum(t.images for t in conc_ticks) / len(conc_ticks)}


def padding_cost(model: ServedModel, repeats: int) -> dict[str, float]:
    """Forward time of one image alone vs padded to two rows (``batch_invariant``)."""
    x = torch.randn(1, *model.shape, device=model.device)
    t = torch.full((1,), model.diffusion.num_timesteps // 2, device=model.device)
    out = {}
    for label, pad in (("forward_b1_ms", False), ("forward_b1_padded_ms", True)):
        model.batch_invariant = pad
        model.forward(x, t)
        start = time.perf_counter()
        for _ in range(repeats):
            model.forward(x, t)
        out[label] = (time.perf_counter() - start) / repeats * 1000
    return out | {"padded_over_alone": out["forward_b1_padded_ms"] / out["forward_b1_ms"]}


def print_report(report: dict[str, Any], steps: int) -> None:
    pad = report["padding"]
    print(f"\n{report['preset']} preset, {report['device']}, {torch.get_num_threads()} thread(s), {steps} steps, "
          f"best of {report['repeats']}, batch_invariant={report['batch_invariant']}\n")
    print(markdown_table(
        ["jobs", "sequential s", "concurrent s", "sequential img/s", "concurrent img/s", "concurrent / sequential",
         "U-Net only", "outside forward % (seq / conc)"],
        [[r["jobs"], f"{r['sequential_s']:.2f}", f"{r['concurrent_s']:.2f}", r["sequential_img_s"],
          r["concurrent_img_s"], f"{r['concurrent_over_sequential']:.3f}",
          f"{r['unet_concurrent_over_sequential']:.3f}",
          f"{r['outside_pct_sequential']:.2f} / {r['outside_pct_concurrent']:.2f}"] for r in report["rows"]]))
    print(f"\nbatch_invariant padding: one image {pad['forward_b1_ms']:.1f} ms alone, "
          f"{pad['forward_b1_padded_ms']:.1f} ms padded to two rows (padded / alone {pad['padded_over_alone']:.2f})")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--preset", default="cifar10", choices=sorted(MODEL_PRESETS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of each, interleaved; the best is kept")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-invariant", choices=("on", "off"), default=None,
                    help="default: on for the CPU, as the worker")
    add_out_argument(ap)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run("bench_batching", args, args.device, argv)
    logging.basicConfig(level=logging.WARNING)
    set_threads(args.threads)
    invariant = (args.device == "cpu") if args.batch_invariant is None else args.batch_invariant == "on"
    model = build_model(args.preset, args.device, invariant)
    model.eps_fn.warm_up((1, 2, max(args.jobs)))

    rows = []
    with RedisServer() as server:
        store = JobStore(connect(server.url, timeout=5.0))
        for n in args.jobs:
            rows.append(row(model, store, n, args.steps, args.repeats, max(args.jobs)))
            print(json.dumps(rows[-1]), flush=True)
    report = {"preset": args.preset, "device": args.device, "repeats": args.repeats, "batch_invariant": invariant,
              "rows": rows, "padding": padding_cost(model, repeats=5)}

    out = run.write(report)
    print_report(report, args.steps)
    print(f"\nraw: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
