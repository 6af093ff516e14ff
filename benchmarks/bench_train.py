"""Training throughput: our training step against an equivalent diffusers ``UNet2DModel`` step, in one run.

Both sides train the same architecture (a model preset's U-Net; diffusers gets the equivalent
``UNet2DModel`` config, and the parameter counts are checked equal) on the same batches with the same recipe:
L_simple on ``q_sample`` inputs, Adam, global-norm gradient clipping and an EMA update after every step.

- ours: ``model.train.Trainer.train_step`` (data, lr warm-up, loss, backward, clip, Adam, ``model.ema.EMA``);
- diffusers: ``UNet2DModel`` forward, the same loss/clip/Adam, and ``diffusers.training_utils.EMAModel``.

The two are timed in interleaved rounds (ours, diffusers, ours, ...) after one warm-up step each, so a shared
machine's load drifts over both alike; the table gives the median seconds per step, images/s and
``ours_over_diffusers`` = our seconds per step / diffusers' (below 1: ours is faster).
diffusers is a benchmark/test-only dependency.

    .venv/bin/python -m benchmarks.bench_train --preset digits --batches 16 64 --steps 6 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Run, add_out_argument, compare, interleaved, markdown_table, set_threads, timer
from benchmarks.models import diffusers_config_from_unet
from model.train import Trainer, make_step_inputs
from model.train_config import resolve_config


def diffusers_step(trainer: Trainer) -> Callable[[], None]:
    """One diffusers training step on the same batches and recipe as ``trainer``."""
    import diffusers
    from diffusers.training_utils import EMAModel

    cfg = trainer.cfg
    net: Any = diffusers.UNet2DModel(**diffusers_config_from_unet(trainer.config.unet))
    net = net.to(trainer.device).train()
    ours, theirs = trainer.model.num_parameters(), sum(p.numel() for p in net.parameters())
    if ours != theirs:
        raise SystemExit(f"configs differ: {ours} parameters (ours) vs {theirs} (diffusers)")
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    ema = EMAModel(net.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=1.0)
    state = {"step": 0}

    def step() -> None:
        inp = make_step_inputs(trainer.data, trainer.stream, state["step"], cfg,
                               trainer.diffusion.num_timesteps, trainer.ddp, trainer.device)
        x_t = trainer.diffusion.q_sample(inp.x0, inp.t, inp.noise)
        loss = ((net(x_t, inp.t).sample - inp.noise) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        ema.step(net.parameters())
        state["step"] += 1

    return step


def row(preset: str, batch: int, steps: int, device: torch.device, tmp: Path) -> dict[str, Any]:
    """Both sides at one preset and batch size: ``steps`` interleaved rounds after a warm-up step of each."""
    config = resolve_config(preset, None, {"train": {"batch_size": batch, "dataset": "digits", "warmup_steps": 0,
                                                     "device": device.type}})
    trainer = Trainer(config, tmp / f"{preset}-{batch}", device=device)
    t = interleaved({"ours": timer(trainer.train_step, device), "diffusers": timer(diffusers_step(trainer), device)},
                    steps)
    ours_s, diffusers_s = statistics.median(t["ours"]), statistics.median(t["diffusers"])
    return {"preset": preset, "params": trainer.model.num_parameters(), "batch": batch, "ours_s": ours_s,
            "diffusers_s": diffusers_s, "ours_img_s": batch / ours_s, "diffusers_img_s": batch / diffusers_s,
            **compare(t["ours"], t["diffusers"], "ours_over_diffusers"), "ours_runs_s": t["ours"],
            "diffusers_runs_s": t["diffusers"]}


def table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(
        ["preset", "params", "batch", "ours s/step", "diffusers s/step", "ours img/s", "diffusers img/s",
         "ours / diffusers (min-max)"],
        [[r["preset"], f"{r['params'] / 1e6:.2f}M", r["batch"], f"{r['ours_s']:.3f}", f"{r['diffusers_s']:.3f}",
          f"{r['ours_img_s']:.1f}", f"{r['diffusers_img_s']:.1f}",
          f"{r['ours_over_diffusers']:.2f} ({r['ours_over_diffusers_min']:.2f}-{r['ours_over_diffusers_max']:.2f})"]
         for r in rows])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", default=["digits"], help="model presets (their U-Net configs)")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--steps", type=int, default=6, help="timed steps (rounds) per side (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_out_argument(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run("bench_train", args, args.device, argv)
    set_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row(p, b, args.steps, device, Path(tmp)) for p in args.preset for b in args.batches]
    print(f"\ntraining step, ours vs diffusers UNet2DModel ({device}, {torch.get_num_threads()} thread(s)); "
          "ours / diffusers = our seconds per step / diffusers' (below 1: ours is faster)")
    print(table(rows))
    print(f"\nwrote {run.write({'rows': rows})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
