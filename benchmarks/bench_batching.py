"""Continuous batching in the worker: N concurrent single-image jobs against the same jobs one after another.

For N in ``--jobs`` (default 1, 4, 16) the worker's ``Engine`` runs N single-image jobs (different seeds) with
the worker's real sink (``StoreSink``: progress and cancel checks in one Redis round-trip per step, frames and
final PNGs encoded and stored on the background lanes) against a private real redis-server:

- *sequential*: one job at a time, each to the end (what a worker without batching does);
- *concurrent*: all N admitted at once, so each step is one U-Net forward over N images.

Reported per N: wall seconds and aggregate images/s of both, ``gain`` = concurrent / sequential images/s, the
U-Net-only gain over the same runs (the ceiling), and ``outside_pct``: the share of each denoising step (the
engine's tick: pack inputs, forward, split, per-job updates, the Redis round-trip, handing frames to the lanes)
spent outside the U-Net forward. Also the cost of ``batch_invariant`` (a lone image padded to two rows).

The models have random weights (timing only). Raw figures go to ``benchmarks/results/`` as JSON.

    .venv/bin/python benchmarks/bench_batching.py --preset cifar10 --steps 5 --jobs 1 4 16 --threads 1 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import MODEL_PRESETS
from model.diffusion import GaussianDiffusion
from model.unet import UNet
from service.engine import Engine, JobSpec, ServedModel, TickStats
from service.previews import Lanes
from service.queue import JobStore, connect
from service.redis_server import RedisServer
from service.worker import StoreSink

RESULTS = Path(__file__).resolve().parent / "results"


def build_model(preset: str, device: str, batch_invariant: bool) -> ServedModel:
    cfg = MODEL_PRESETS[preset]
    torch.manual_seed(0)
    unet = UNet(cfg.unet).to(device)
    with torch.no_grad():  # the paper's zero-init output layers would make eps identically 0
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return ServedModel(preset, unet, GaussianDiffusion.from_config(cfg.diffusion, device=device),
                       batch_invariant=batch_invariant)


def submit(store: JobStore, model: ServedModel, n: int, steps: int, first_seed: int) -> list[JobSpec]:
    """N single-image jobs, created and started in Redis as a worker would find them."""
    specs = []
    for i in range(n):
        req: dict[str, Any] = {"num_images": 1, "seed": first_seed + i, "steps": steps, "sampler": "ddpm", "eta": 0.0,
               "variance": "fixedlarge", "preview_every": max(1, steps // 4), "model": model.name}
        job_id = store.submit(req, model.name, num_images=1, total_steps=steps, seeds=[req["seed"]],
                              max_queue_length=10_000)
        store.start(job_id, "bench")
        specs.append(JobSpec.from_request(job_id, model.name, req))
    return specs


def run(model: ServedModel, store: JobStore, specs: list[JobSpec], concurrent: bool, max_batch: int
        ) -> tuple[float, list[TickStats]]:
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
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cifar10", choices=sorted(MODEL_PRESETS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each, alternating; the best is kept")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-invariant", choices=("on", "off"), default=None,
                    help="default: on for the CPU, as the worker")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    invariant = (args.device == "cpu") if args.batch_invariant is None else args.batch_invariant == "on"
    model = build_model(args.preset, args.device, invariant)
    model.warm_up((1, 2, max(args.jobs)))
    rows = []
    with RedisServer() as server:
        store = JobStore(connect(server.url, timeout=5.0))
        for n in args.jobs:
            seq_s, seq_ticks, conc_s, conc_ticks = float("inf"), [], float("inf"), []
            for _ in range(args.repeats):  # alternate the two, keep the best of each (a shared, noisy machine)
                s, ticks = run(model, store, submit(store, model, n, args.steps, 0), False, max(args.jobs))
                if s < seq_s:
                    seq_s, seq_ticks = s, ticks
                s, ticks = run(model, store, submit(store, model, n, args.steps, 0), True, max(args.jobs))
                if s < conc_s:
                    conc_s, conc_ticks = s, ticks
            fwd_seq = sum(t.forward_s for t in seq_ticks)
            fwd_conc = sum(t.forward_s for t in conc_ticks)
            tick_conc = sum(t.total_s for t in conc_ticks)
            tick_seq = sum(t.total_s for t in seq_ticks)
            rows.append({
                "jobs": n, "steps": args.steps, "sequential_s": seq_s, "concurrent_s": conc_s,
                "sequential_img_s": n / seq_s, "concurrent_img_s": n / conc_s, "gain": seq_s / conc_s,
                "unet_gain": fwd_seq / fwd_conc,
                "outside_pct_sequential": 100 * (tick_seq - fwd_seq) / tick_seq,
                "outside_pct_concurrent": 100 * (tick_conc - fwd_conc) / tick_conc,
                "mean_batch": sum(t.images for t in conc_ticks) / len(conc_ticks),
            })
            print(json.dumps(rows[-1]), flush=True)
    pad = padding_cost(model, repeats=5)
    report = {"script": "bench_batching", "preset": args.preset, "device": args.device, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "batch_invariant": invariant, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "rows": rows, "padding": pad}
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"bench_batching-{args.device}-{stamp}.json"
    out.write_text(json.dumps(report, indent=2))

    print(f"\n{args.preset} preset, {args.device}, {torch.get_num_threads()} thread(s), {args.steps} steps, "
          f"best of {args.repeats}, batch_invariant={invariant}; raw: {out.relative_to(RESULTS.parent)}\n")
    print("| jobs | sequential s | concurrent s | sequential img/s | concurrent img/s | gain | U-Net-only gain "
          "| outside forward % (seq / conc) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['jobs']} | {r['sequential_s']:.2f} | {r['concurrent_s']:.2f} | {r['sequential_img_s']:.3g} "
              f"| {r['concurrent_img_s']:.3g} | {r['gain']:.2f}x | {r['unet_gain']:.2f}x "
              f"| {r['outside_pct_sequential']:.2f} / {r['outside_pct_concurrent']:.2f} |")
    print(f"\nbatch_invariant padding: one image {pad['forward_b1_ms']:.1f} ms alone, "
          f"{pad['forward_b1_padded_ms']:.1f} ms padded to two rows "
          f"({pad['forward_b1_padded_ms'] / pad['forward_b1_ms']:.2f}x)")


if __name__ == "__main__":
    main()
