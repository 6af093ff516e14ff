"""Training throughput: our training step against an equivalent diffusers ``UNet2DModel`` step, in one run.

Both sides train the same architecture (a model preset's U-Net; diffusers gets the equivalent
``UNet2DModel`` config, and the parameter counts are checked equal) on the same batches with the same recipe:
L_simple on ``q_sample`` inputs, Adam, global-norm gradient clipping and an EMA update after every step.

- ours: ``model.train.Trainer.train_step`` (data, lr warm-up, loss, backward, clip, Adam, ``model.ema.EMA``);
- diffusers: ``UNet2DModel`` forward, the same loss/clip/Adam, and ``diffusers.training_utils.EMAModel``.

The two are timed alternately (A, B, A, B, ...) so a shared machine's load drifts over both alike; the table
gives the median seconds per step, images/s and the ratio ours / diffusers (>1: ours is faster).
diffusers is a benchmark/test-only dependency.

    python benchmarks/bench_train.py --preset digits --batches 16 64 --steps 6 --threads 1
"""

from __future__ import annotations

import argparse
import json
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

from model.config import UNetConfig
from model.train import Trainer, make_step_inputs
from model.train_config import resolve_config


def diffusers_config(cfg: UNetConfig) -> dict[str, Any]:
    """The UNet2DModel config equivalent to ours (the paper's layout, as google/ddpm-* use)."""
    res = [cfg.image_size // 2**i for i in range(len(cfg.ch_mult))]
    down = ["AttnDownBlock2D" if r in cfg.attn_resolutions else "DownBlock2D" for r in res]
    up = ["AttnUpBlock2D" if r in cfg.attn_resolutions else "UpBlock2D" for r in reversed(res)]
    return {
        "sample_size": cfg.image_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "down_block_types": down, "up_block_types": up,
        "layers_per_block": cfg.num_res_blocks, "freq_shift": 1, "flip_sin_to_cos": False,
        "downsample_padding": 0, "norm_eps": cfg.norm_eps, "norm_num_groups": cfg.num_groups,
        "attention_head_dim": None, "dropout": cfg.dropout,
    }


def diffusers_step(trainer: Trainer) -> Callable[[], None]:
    """One diffusers training step on the same batches and recipe as ``trainer``."""
    import diffusers
    from diffusers.training_utils import EMAModel

    cfg = trainer.cfg
    net = diffusers.UNet2DModel(**diffusers_config(trainer.config.unet)).to(trainer.device).train()
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(fns: dict[str, Callable[[], Any]], device: torch.device, steps: int) -> dict[str, float]:
    """Median seconds per call of each function, called in turn ``steps`` times after one warm-up each."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(steps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def row(preset: str, batch: int, steps: int, device: torch.device, tmp: Path) -> dict[str, Any]:
    config = resolve_config(preset, None, {"train": {"batch_size": batch, "dataset": "digits", "warmup_steps": 0,
                                                     "device": device.type}})
    trainer = Trainer(config, tmp / f"{preset}-{batch}", device=device)
    t = alternate({"ours": trainer.train_step, "diffusers": diffusers_step(trainer)}, device, steps)
    return {"preset": preset, "params": trainer.model.num_parameters(), "batch": batch,
            "ours_s": t["ours"], "diffusers_s": t["diffusers"], "ours_img_s": batch / t["ours"],
            "diffusers_img_s": batch / t["diffusers"], "ratio": t["diffusers"] / t["ours"]}


def print_table(rows: list[dict[str, Any]], device: torch.device) -> None:
    print(f"\ntraining step, ours vs diffusers UNet2DModel ({device}, {torch.get_num_threads()} thread(s)); "
          "ratio = our images/s / diffusers' images/s")
    print("| preset | params | batch | ours s/step | diffusers s/step | ours img/s | diffusers img/s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['preset']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['ours_s']:.3f} | "
              f"{r['diffusers_s']:.3f} | {r['ours_img_s']:.1f} | {r['diffusers_img_s']:.1f} | {r['ratio']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", default=["digits"], help="model presets (their U-Net configs)")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row(p, b, args.steps, device, Path(tmp)) for p in args.preset for b in args.batches]
    print_table(rows, device)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"bench_train-{device.type}-{stamp}.json"
    path.write_text(json.dumps({
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
        "rows": rows}, indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
