"""``ddpm train``: presets and overrides, EMA warm-up, checkpoints, exact resume, data parallelism."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model.checkpoint import load_checkpoint
from model.ema import EMA
from model.train_config import TrainConfig, load_config_file, resolve_config
from service.cli import main as cli

# An 8x8 one-channel U-Net on the raw 8x8 digits, 50 timesteps: a few steps take well under a second.
TINY = ["--preset", "tiny", "--unet-image-size", "8", "--unet-in-channels", "1", "--unet-out-channels", "1",
        "--unet-ch", "16", "--unet-ch-mult", "1,2", "--unet-num-groups", "4", "--unet-attn-resolutions", "4",
        "--diffusion-num-timesteps", "50", "--batch-size", "8", "--num-samples", "4", "--sample-steps", "5",
        "--log-every", "1", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():  # type: ignore[no-untyped-def]
    # One thread: on a busy shared CPU two threads per tiny op contend badly; restored after each test.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _train(out: Path, *extra: str) -> int:
    return cli(["train", *TINY, "--out", str(out), *extra])


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_presets_carry_the_papers_hyper_parameters() -> None:
    c = resolve_config("cifar10")
    t = c.train
    assert (t.lr, t.batch_size, t.warmup_steps, t.grad_clip, t.ema_decay, t.random_flip, t.steps) == (
        2e-4, 128, 5000, 1.0, 0.9999, True, 800_000)
    assert c.unet.dropout == 0.1 and c.diffusion.num_timesteps == 1000 and c.diffusion.beta_schedule == "linear"
    big = resolve_config("256")
    assert (big.train.lr, big.train.batch_size, big.unet.image_size) == (2e-5, 64, 256)
    digits = resolve_config("digits")
    assert digits.train.random_flip is False  # a flipped 2 is not a digit


def test_config_file_then_flags_override_the_preset(tmp_path: Path) -> None:
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("lr: 0.001\ntrain:\n  steps: 7\nunet:\n  ch: 16\n  ch_mult: [1, 2]\n")
    file_overrides = load_config_file(yaml_file)
    c = resolve_config("tiny", file_overrides, {"train": {"steps": 9}})
    assert (c.train.lr, c.train.steps, c.unet.ch, c.unet.ch_mult) == (0.001, 9, 16, (1, 2))
    (tmp_path / "bad.json").write_text('{"lr": 0.1, "learning_rate": 3}')
    with pytest.raises(ValueError, match="learning_rate"):
        load_config_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="ema_decay"):
        resolve_config("tiny", None, {"train": {"ema_decay": 1.5}})


def test_resolved_config_is_printed_from_cli_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert _train(tmp_path / "r", "--lr", "0.003", "--random-flip", "--print-config") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["lr"] == 0.003 and printed["train"]["random_flip"] is True
    assert printed["unet"]["ch_mult"] == [1, 2] and printed["diffusion"]["num_timesteps"] == 50


def test_ema_decay_warms_up_and_tracks_the_weights() -> None:
    net = torch.nn.Linear(2, 1, bias=False)
    ema = EMA(net, 0.999)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        with torch.no_grad():
            net.weight.fill_(1.0)
        ema.update(net)
    assert decays == pytest.approx([0.1, 2 / 11, 3 / 12])  # (1 + n) / (10 + n), far below 0.999
    assert EMA(net, 0.999, warmup=False).current_decay() == 0.999
    # After a few updates towards constant weights the average is already most of the way there.
    assert float(ema.state_dict()["weight"].min()) > 0.5


def test_a_run_writes_servable_ema_checkpoints_metrics_and_previews(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _train(run, "--steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "2",
                  "--sample-every", "3") == 0
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 6
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "steps_per_s", "images_per_s", "ema_decay"} <= set(records[0])
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["ema-00000004.safetensors", "ema-00000006.safetensors",
                     "state-00000004.safetensors", "state-00000006.safetensors"]  # the last 2 kept
    served = load_checkpoint(run / "checkpoints" / "ema-00000006.safetensors")
    assert served.metadata["ema"] and served.metadata["step"] == 6 and served.metadata["dataset"] == "digits"
    assert served.unet_config.image_size == 8 and served.diffusion.num_timesteps == 50
    with open(run / "checkpoints" / "state-00000006.safetensors", "rb") as fh:
        assert fh.read(1) != b"\x80"  # safetensors header, not a pickle
    with safe_open(str(run / "checkpoints" / "state-00000006.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "rng.cpu" in keys and any(k.startswith("optim.") for k in keys) and any(k.startswith("ema.") for k in keys)
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "grid-00000003.png", "grid-00000006.png", "strip-00000003.png", "strip-00000006.png"]


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    common = ("--steps", "6", "--checkpoint-every", "100", "--sample-every", "100", "--random-flip")
    assert _train(tmp_path / "whole", *common) == 0
    assert _train(tmp_path / "split", *common, "--stop-after", "3") == 0
    assert len(_losses(tmp_path / "split")) == 3
    assert _train(tmp_path / "split", *common, "--resume") == 0
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")  # bit for bit
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "ema-00000006.safetensors").unet.state_dict()
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "ema-00000006.safetensors").unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_requests_fail_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(tmp_path / "r1", "--dataset", f"folder:{tmp_path / 'nothing'}") == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "r1" / "checkpoints").exists()
    assert _train(tmp_path / "r2", "--resume") == 2
    assert "--resume" in capsys.readouterr().err
    assert _train(tmp_path / "r3", "--steps", "1") == 0
    assert _train(tmp_path / "r3", "--steps", "1") == 2  # never silently overwrites a run
    assert "already holds a run" in capsys.readouterr().err


def test_lr_warms_up_linearly() -> None:
    from model.train import Trainer

    t = Trainer.__new__(Trainer)
    t.cfg = TrainConfig(lr=1e-3, warmup_steps=4)
    assert [t.lr_at(s) for s in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_processes_with_gloo_compute_the_same_run_as_one(tmp_path: Path) -> None:
    args = [*TINY, "--steps", "3", "--checkpoint-every", "100", "--sample-every", "100"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "service.cli", "train", *args, "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 process(es)" in done.stderr
    assert _train(tmp_path / "single", *args[len(TINY):]) == 0
    # The global batch is split over the ranks and the gradients averaged: the same losses as one process.
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "single"), rel=1e-4)


def test_bf16_autocast_trains_and_keeps_float32_weights(tmp_path: Path) -> None:
    assert _train(tmp_path / "bf16", "--steps", "2", "--precision", "bf16", "--sample-every", "100") == 0
    losses = _losses(tmp_path / "bf16")
    assert len(losses) == 2 and all(0.0 < v < 10.0 for v in losses)
    served = load_checkpoint(tmp_path / "bf16" / "checkpoints" / "ema-00000002.safetensors")
    assert all(p.dtype == torch.float32 for p in served.unet.parameters())


def test_sigterm_stops_after_the_step_with_a_resumable_checkpoint(tmp_path: Path) -> None:
    import signal
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "service.cli", "train", *TINY, "--steps", "100000", "--checkpoint-every", "100000",
           "--sample-every", "100000", "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()) and proc.poll() is None:
        assert time.monotonic() < deadline, "training never logged a step"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    # Stopped before its last step: 128 + SIGTERM, so an orchestrator retries it (with --resume) rather than
    # counting the run as complete.
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stop requested" in err
    states = sorted((run / "checkpoints").glob("state-*.safetensors"))
    assert len(states) == 1 and int(states[0].stem.split("-")[1]) >= 1
    assert not list((run / "checkpoints").glob("*.tmp"))  # nothing half-written
