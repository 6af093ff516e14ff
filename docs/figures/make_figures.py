"""``make figures``: the paper's figures, made by the bundled demo model, into docs/figures/ (see README.md there).

Every figure comes from ``checkpoints/digits.safetensors`` (1,590,177 parameters, T = 1000) and fixed seeds, in
fp32 with one torch thread, so a rerun on the same machine and torch build writes the same PNG bytes (another CPU
may pick other convolution kernels: last-bit differences). Image figures batch several chains into one U-Net
forward per tick, as the service's engine does (``model.sampler.StepDriven``). The training curve is drawn from
``data/digits-train-metrics.jsonl`` and the benchmark chart from ``benchmarks/results/*.json``: files in the
repository, not recomputed here. On a quiet 2-core CPU the whole run takes about five minutes.

    python docs/figures/make_figures.py                 # every figure
    python docs/figures/make_figures.py --only samples interpolation
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.bound import curve, rd_grid
from model.checkpoint import LoadedCheckpoint, load_checkpoint
from model.data import load_dataset, to_model_range
from model.diffusion import EpsFn
from model.evaluate import full_bound_terms
from model.images import grid, to_uint8
from model.latents import DEFAULT_LAMBDAS, encode, interpolation_chain, reconstruction_chain
from model.plots import new_figure, plot_rate_distortion, save_figure, write_rd_csv
from model.sampler import Chain, ImageNoise, StepDriven

log = logging.getLogger("make_figures")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SEED = 0


# ---- running chains together ---------------------------------------------------------------------------------------
def run_together(eps_fn: EpsFn, chains: Sequence[StepDriven[Any]], frames: dict[int, set[int]] | None = None
                 ) -> tuple[list[Any], dict[int, list[torch.Tensor]]]:
    """Drive ``chains`` to the end, all unfinished ones in one forward per tick; the last records, and x0-hat of
    chain k at its steps ``frames[k]``."""
    frames = frames or {}
    last: list[Any] = [None] * len(chains)
    shots: dict[int, list[torch.Tensor]] = {k: [] for k in frames}
    with torch.inference_mode():
        while not all(c.done for c in chains):
            live = [k for k, c in enumerate(chains) if not c.done]
            inputs = [chains[k].model_input() for k in live]
            eps = eps_fn(torch.cat([x for x, _ in inputs]), torch.cat([t for _, t in inputs]))
            for k, e in zip(live, eps.split([x.shape[0] for x, _ in inputs]), strict=True):
                want = chains[k].index in frames.get(k, ())
                last[k] = chains[k].step(e, want_x0=want)
                if want:
                    shots[k].append(last[k].x0_hat.cpu())
    return last, shots


def heldout(ckpt: LoadedCheckpoint, indices: Sequence[int]) -> torch.Tensor:
    cfg = ckpt.unet_config
    test = load_dataset(ckpt.metadata["dataset"], cfg.image_size, cfg.in_channels, "test")
    return to_model_range(test.images(list(indices)))


# ---- picture figures -------------------------------------------------------------------------------------------------
def image_rows(rows: Sequence[torch.Tensor], path: Path, *, row_labels: Sequence[str] = (),
               col_labels: Sequence[str] = (), title: str = "", cell: float = 0.5) -> None:
    """Rows of images (each (N, C, H, W) in [-1, 1], N the same) in one picture, labelled on the left and on top."""
    ncol, size = len(rows[0]), rows[0].shape[-1]
    pixels = to_uint8(grid(torch.cat(list(rows)), nrow=ncol, padding=2)[None])[0]
    left = 0.7 if row_labels else 0.1
    top = (0.3 if col_labels else 0.05) + (0.3 if title else 0.0)
    fig, (ax,) = new_figure(1, width=cell * ncol + left + 0.1, height=cell * len(rows) + top + 0.1)
    ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest")
    centre = [2 + (size + 2) * i + size / 2 for i in range(max(ncol, len(rows)))]
    ax.set_xticks(centre[:ncol] if col_labels else [], list(col_labels), fontsize=7)
    ax.set_yticks(centre[:len(rows)] if row_labels else [], list(row_labels), fontsize=8)
    ax.xaxis.tick_top()
    ax.tick_params(length=0, pad=2)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9, pad=14 if col_labels else 4)
    save_figure(fig, path, dpi=150)


def fig_samples(ckpt: LoadedCheckpoint, out: Path, n: int = 64) -> None:
    """A grid of ``n`` samples, T/4 respaced ancestral steps (fixedlarge)."""
    shape = (ckpt.unet_config.in_channels, ckpt.unet_config.image_size, ckpt.unet_config.image_size)
    steps = max(1, ckpt.diffusion.num_timesteps // 4)
    chain = Chain(ckpt.diffusion, ImageNoise.for_images(SEED, range(n), shape), steps=steps)
    (last,), _ = run_together(ckpt.unet, [chain])
    image_rows(last.x_prev.clamp(-1, 1).split(8), out / "samples.png", cell=0.6,
               title=f"{n} samples of the demo model ({steps} respaced DDPM steps)")


def fig_progressive(ckpt: LoadedCheckpoint, out: Path, n: int = 6) -> None:
    """Fig. 6: x0-hat over all 1000 steps of the chain at t = 1000, 900, ..., 100, 1, one row per image."""
    shape = (ckpt.unet_config.in_channels, ckpt.unet_config.image_size, ckpt.unet_config.image_size)
    chain = Chain(ckpt.diffusion, ImageNoise.for_images(SEED, range(n), shape))
    T = ckpt.diffusion.num_timesteps
    ts = [*range(T, 0, -max(1, T // 10)), 1]
    _, shots = run_together(ckpt.unet, [chain], {0: {T - t for t in ts}})  # step i sees paper time T - i
    per_image = torch.stack(shots[0], dim=1)  # (n, frames, C, H, W)
    image_rows(list(per_image), out / "progressive.png", col_labels=[str(t) for t in ts],
               title=f"x0-hat(x_t) while sampling ({T} steps; Fig. 6), at t =")


def split_points(T: int, fractions: Sequence[float]) -> list[int]:
    """Timesteps at these fractions of T (100, 250, ... for T = 1000)."""
    return [max(1, round(f * T)) for f in fractions]


def fig_reconstruction(ckpt: LoadedCheckpoint, out: Path, n: int = 7) -> None:
    """Fig. 7: one held-out digit, one shared x_t per row, ``n`` samples of p(x0 | x_t), all t steps each."""
    ts = split_points(ckpt.diffusion.num_timesteps, (0.1, 0.25, 0.5, 0.75, 1.0))
    x0 = heldout(ckpt, [0])
    chains = [reconstruction_chain(ckpt.diffusion, x0, start_t=t, seed=SEED, indices=range(n), shared_latent=True)
              for t in ts]
    last, _ = run_together(ckpt.unet, chains)
    rows = []
    for t, chain, rec in zip(ts, chains, last, strict=True):
        x_t = encode(ckpt.diffusion, x0, t, ImageNoise.for_images(SEED, [-1], x0.shape[1:]).draw())
        rows.append(torch.cat([x0, x_t.clamp(-1, 1), rec.x_prev.clamp(-1, 1)]))
        assert chain.done
    image_rows(rows, out / "reconstruction.png", row_labels=[f"t={t}" for t in ts],
               col_labels=["x0", "x_t", *[f"#{i}" for i in range(n)]],
               title="x0, its x_t, and samples of p(x0 | x_t) (Fig. 7)")


def fig_interpolation(ckpt: LoadedCheckpoint, out: Path) -> None:
    """Fig. 8/9: two held-out digits encoded at t, mixed with λ = 0, 0.1, ..., 1, decoded with all t steps."""
    ts = split_points(ckpt.diffusion.num_timesteps, (0.1, 0.25, 0.5))
    a, b = heldout(ckpt, [0]), heldout(ckpt, [3])
    chains = [interpolation_chain(ckpt.diffusion, a, b, DEFAULT_LAMBDAS, t=t, seed=SEED) for t in ts]
    last, _ = run_together(ckpt.unet, chains)
    rows = [torch.cat([a, rec.x_prev.clamp(-1, 1), b]) for rec in last]
    image_rows(rows, out / "interpolation.png", row_labels=[f"t={t}" for t in ts],
               col_labels=["A", *[f"{v:g}" for v in DEFAULT_LAMBDAS], "B"],
               title="interpolation of two encoded digits, λ = 0 ... 1 (Fig. 8, 9)")


# ---- curves ----------------------------------------------------------------------------------------------------------
def fig_rate_distortion(ckpt: LoadedCheckpoint, out: Path, n: int = 48) -> None:
    """Fig. 5 over the first ``n`` held-out digits (the full 1000-term bound): what
    ``ddpm eval --rate-distortion --bpd-images n --seed 0`` writes."""
    cfg = ckpt.unet_config
    test = load_dataset(ckpt.metadata["dataset"], cfg.image_size, cfg.in_channels, "test")
    terms = full_bound_terms(ckpt, test.images(range(n)), seed=SEED)
    T = ckpt.diffusion.num_timesteps
    points = curve(terms, rd_grid(T))
    write_rd_csv(points, T, out / "rate_distortion.csv")
    plot_rate_distortion(points, T, out / "rate_distortion.png",
                         title=f"demo model, {n} held-out digits: {float(terms.bits_per_dim.mean()):.3f} bits/dim")
    log.info("bound %.4f bits/dim, rate at t=1 %.4f, RMSE at t=1 %.3f", float(terms.bits_per_dim.mean()),
             points[0].rate, points[0].distortion)


def fig_training(out: Path, metrics: Path) -> None:
    """The loss of the demo recipe's run, logged every 20 steps, and its running mean."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps, loss = [r["step"] for r in rows], [r["loss"] for r in rows]
    k = 5
    smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
    fig, (ax,) = new_figure(1, width=5.0, height=3.0)
    ax.plot(steps, loss, ".", color="tab:gray", markersize=3, label="L_simple of the step's batch")
    ax.plot(steps, smooth, color="tab:blue", label=f"running mean of {k}")
    ax.set(yscale="log", xlabel="training step", ylabel="loss (Eq. 14)",
           title=f"training the demo model: {metrics.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, out / "training_curve.png")


@dataclass(frozen=True)
class Ratio:
    """One bar of the benchmark chart: ``value`` > 1 means faster than the baseline named in ``label``."""

    label: str
    pattern: str  # results file glob; the newest file for which ``extract`` succeeds is used
    extract: Callable[[dict[str, Any]], float]


def _row(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    """The row with these values; ``KeyError`` when the run has none (its file is then skipped)."""
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    raise KeyError(f"no row {match}")


def _of_preset(d: dict[str, Any], preset: str) -> dict[str, Any]:
    if d.get("preset") != preset:
        raise KeyError(f"not a {preset} run")
    return d


def _speed(row: dict[str, Any], time_ratio: str, old_speed_ratio: str) -> float:
    """A speed-up (> 1: faster) from a row: 1 / its time ratio (benchmarks' convention since the shared helper),
    or the speed ratio an older result file stored."""
    return 1 / row[time_ratio] if time_ratio in row else float(row[old_speed_ratio])


def _engine_bf16(d: dict[str, Any]) -> float:
    rows = d["engine"]
    return _row(rows, setting="bf16", jobs=16)["images_per_s_1000"] / _row(rows, setting="fp32",
                                                                           jobs=16)["images_per_s_1000"]


RATIOS = [
    Ratio("sampling vs diffusers DDPMPipeline, batch 1", "bench_sampler-*.json",
          lambda d: 1 / _row(d["versus_diffusers"], batch=1)["ours_over_diffusers"]),
    Ratio("sampling vs diffusers DDPMPipeline, batch 16", "bench_sampler-*.json",
          lambda d: 1 / _row(d["versus_diffusers"], batch=16)["ours_over_diffusers"]),
    Ratio("training step vs diffusers, digits, batch 64", "bench_train-*.json",
          lambda d: _speed(_row(d["rows"], preset="digits", batch=64), "ours_over_diffusers", "ratio")),
    Ratio("training step vs diffusers, CIFAR10, batch 8", "bench_train-*.json",
          lambda d: _speed(_row(d["rows"], preset="cifar10", batch=8), "ours_over_diffusers", "ratio")),
    Ratio("16 jobs batched vs one at a time, digits", "bench_batching-*.json",
          lambda d: _speed(_row(_of_preset(d, "digits")["rows"], jobs=16), "concurrent_over_sequential", "gain")),
    Ratio("16 jobs batched vs one at a time, CIFAR10", "bench_batching-*.json",
          lambda d: _speed(_row(_of_preset(d, "cifar10")["rows"], jobs=16), "concurrent_over_sequential",
                           "gain")),
    Ratio("bf16 vs fp32 engine, 16 jobs, digits (CPU)", "bench_gpu-*.json", _engine_bf16),
    Ratio("whole stack vs direct sampler call", "bench_stack-*.json", lambda d: 1 / d["stack_over_direct"]),
    Ratio("likelihood (1000 terms) vs 1000 bare U-Net forwards", "bench_likelihood-*.json",
          lambda d: 1 / d["likelihood_over_forwards"]),
]


def fig_benchmarks(out: Path, results: Path) -> None:
    """The ratios measured side by side by benchmarks/ (values from benchmarks/results, newest run of each)."""
    bars = []
    for r in RATIOS:
        for path in sorted(results.glob(r.pattern), reverse=True):  # file names end in the UTC time
            try:
                value = float(r.extract(json.loads(path.read_text())))
            except (KeyError, TypeError):
                continue
            bars.append((r.label, value, path.name))
            break
        else:
            log.warning("no result file for %r", r.label)
    fig, (ax,) = new_figure(1, width=7.5, height=0.38 * len(bars) + 1.0)
    labels = [b[0] for b in bars][::-1]
    values = [b[1] for b in bars][::-1]
    ax.barh(labels, values, color=["tab:green" if v >= 1 else "tab:orange" for v in values])
    ax.axvline(1.0, color="black", linewidth=0.8)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}x", va="center", fontsize=8)
    ax.set_xlabel("speed relative to the baseline (> 1: faster), CPU")
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlim(0, max(values) * 1.15)
    save_figure(fig, out / "benchmarks.png")
    for label, value, name in bars:
        log.info("%-55s %6.2fx  %s", label, value, name)


# ---- main ----------------------------------------------------------------------------------------------------
FIGURES = ("samples", "progressive", "reconstruction", "interpolation", "rate_distortion", "training", "benchmarks")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "digits.safetensors")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--only", nargs="+", choices=FIGURES, default=FIGURES)
    parser.add_argument("--metrics", type=Path, default=HERE / "data" / "digits-train-metrics.jsonl")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--rd-images", type=int, default=48, help="held-out digits in the rate-distortion curve")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(1)  # the same kernels, so the same bytes, on every run
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(args.checkpoint, device="cpu")
    ckpt.unet.cache_time_embeddings(ckpt.diffusion.num_timesteps)
    jobs: dict[str, Callable[[], None]] = {
        "samples": lambda: fig_samples(ckpt, args.out),
        "progressive": lambda: fig_progressive(ckpt, args.out),
        "reconstruction": lambda: fig_reconstruction(ckpt, args.out),
        "interpolation": lambda: fig_interpolation(ckpt, args.out),
        "rate_distortion": lambda: fig_rate_distortion(ckpt, args.out, args.rd_images),
        "training": lambda: fig_training(args.out, args.metrics),
        "benchmarks": lambda: fig_benchmarks(args.out, args.results),
    }
    for name in args.only:
        t0 = time.perf_counter()
        jobs[name]()
        log.info("%s: %.1f s", name, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
