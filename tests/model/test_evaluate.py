"""``ddpm eval``: the Fréchet distance, the feature classifier, bits/dim and the end-to-end report."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import save_checkpoint
from model.config import DiffusionConfig, UNetConfig
from model.data import load_dataset, to_model_range
from model.evaluate import frechet_distance, train_classifier
from model.unet import UNet
from service.cli import main as cli


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_frechet_distance_matches_the_closed_form() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # Same covariance, mean shifted by c: the distance is |c|^2 exactly.
    c = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert frechet_distance(a, a + c) == pytest.approx(float(c @ c), rel=1e-9)
    # Independent isotropic Gaussians with variances 1 and 4: Tr(1 + 4 - 2*2) per dimension = 1 each.
    x, y = rng.normal(size=(200_000, 3)), 2.0 * rng.normal(size=(200_000, 3))
    assert frechet_distance(x, y) == pytest.approx(3.0, rel=0.02)


def test_feature_classifier_learns_the_digits() -> None:
    train = load_dataset("digits", 8, 1, "train")
    test = load_dataset("digits", 8, 1, "test")
    net = train_classifier(train, epochs=4)
    with torch.no_grad():
        pred = net(to_model_range(test.all_images())).argmax(dim=1)
    assert float((pred == test.labels).float().mean()) > 0.85  # type: ignore[operator]


def _checkpoint(path: Path, *, trained: bool) -> Path:
    """A tiny 8x8 model: zero-initialised output (eps = 0, 'untrained'), or random weights."""
    cfg = UNetConfig(image_size=8, in_channels=1, out_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(4,), dropout=0.0, num_groups=4)
    torch.manual_seed(0)
    unet = UNet(cfg)
    if trained:
        torch.nn.init.normal_(unet.conv_out.weight, std=0.01)
    save_checkpoint(path, unet, cfg, DiffusionConfig(num_timesteps=20), dataset="digits", step=7)
    return path


def test_eval_reports_every_figure_with_its_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path / "m.safetensors", trained=False)
    args = ["eval", "--checkpoint", str(ckpt), "--bpd-num-t", "3", "--bpd-images", "40", "--num-samples", "60",
            "--sample-steps", "5", "--classifier-cache", str(tmp_path / "cache"), "--json", str(tmp_path / "r.json"),
            "--grid", str(tmp_path / "grid.png")]
    assert cli(args) == 0
    out = capsys.readouterr().out
    for label in ("bits/dim (held-out)", "classifier FD: samples vs train", "classifier FD: held-out vs train",
                  "sample class histogram", "held-out class histogram"):
        assert label in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["step"] == 7 and report["num_samples"] == 60 and sum(report["sample_class_histogram"]) == 60
    assert sum(report["heldout_class_histogram"]) == 60
    assert np.isfinite(report["bpd"]) and report["bpd"] > 0
    # A model that predicts eps = 0 makes noise, far from the digits; real held-out digits are close.
    assert report["fd_samples_vs_train"] > 5 * report["fd_heldout_vs_train"]
    assert report["classifier_accuracy"] > 0.8
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert len(list((tmp_path / "cache").glob("classifier-*.safetensors"))) == 1  # reused next time


def test_full_bound_and_estimate_agree_on_average(tmp_path: Path) -> None:
    from model.checkpoint import load_checkpoint
    from model.evaluate import bits_per_dim

    ckpt = load_checkpoint(_checkpoint(tmp_path / "m.safetensors", trained=True))
    images = load_dataset("digits", 8, 1, "test").images(range(32))
    full, _ = bits_per_dim(ckpt, images, full_bound=True)
    est, err = bits_per_dim(ckpt, images, num_t=19)
    assert est == pytest.approx(full, abs=4 * err + 0.05 * full)


def test_eval_refuses_a_missing_checkpoint_or_foreign_inception_weights(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["eval", "--checkpoint", str(tmp_path / "none.safetensors")]) == 2
    assert "file not found" in capsys.readouterr().err
    ckpt = _checkpoint(tmp_path / "m.safetensors", trained=False)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    assert cli(["eval", "--checkpoint", str(ckpt), "--inception-weights", str(tmp_path / "other.pth")]) == 2
    assert "not the pytorch-fid Inception weights" in capsys.readouterr().err


def test_fid_with_inception_weights_from_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from model.inception import FIDInception

    # A weights file in the pytorch-fid layout (random values: this checks the plumbing, not the number).
    torch.manual_seed(0)
    torch.save(FIDInception().state_dict(), tmp_path / "pt_inception.pth")
    ckpt = _checkpoint(tmp_path / "m.safetensors", trained=False)
    args = ["eval", "--checkpoint", str(ckpt), "--skip-bpd", "--num-samples", "6", "--sample-steps", "2",
            "--fid-train-images", "6", "--inception-weights", str(tmp_path / "pt_inception.pth"),
            "--classifier-cache", str(tmp_path / "cache"), "--json", str(tmp_path / "r.json")]
    assert cli(args) == 0
    assert "FID: samples vs train" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert np.isfinite(report["fid_samples_vs_train"]) and np.isfinite(report["fid_heldout_vs_train"])


def test_full_bound_is_the_likelihood_of_each_image_with_its_own_stream(tmp_path: Path) -> None:
    from model.bound import likelihood
    from model.checkpoint import load_checkpoint
    from model.evaluate import bits_per_dim, full_bound_terms

    ckpt = load_checkpoint(_checkpoint(tmp_path / "m.safetensors", trained=True))
    images = load_dataset("digits", 8, 1, "test").images(range(6))
    terms = full_bound_terms(ckpt, images, batch=4, seed=3)  # two batches: images 4 and 5 are streams 4 and 5
    tail = likelihood(ckpt.unet, ckpt.diffusion, to_model_range(images[4:]), seed=3, first_index=4)
    torch.testing.assert_close(terms.terms[4:], tail.terms, atol=1e-6, rtol=0)
    mean, err = bits_per_dim(ckpt, images, full_bound=True, batch=4, seed=3)
    assert mean == pytest.approx(float(terms.bits_per_dim.double().mean()), rel=1e-12) and err > 0


def test_eval_rate_distortion_writes_the_curve_and_the_figure(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import csv

    ckpt = _checkpoint(tmp_path / "m.safetensors", trained=True)
    rd = tmp_path / "rd.csv"
    args = ["eval", "--checkpoint", str(ckpt), "--skip-samples", "--bpd-images", "8", "--rate-distortion", str(rd),
            "--json", str(tmp_path / "r.json")]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "full 20-term bound, 8 images" in out and "distortion at t = 1" in out
    rows = list(csv.DictReader(rd.open()))
    assert [int(r["t"]) for r in rows] == list(range(1, 21))
    assert [int(r["reverse_steps"]) for r in rows] == list(range(19, -1, -1))
    rate = [float(r["rate_bits_per_dim"]) for r in rows]
    dist = [float(r["distortion_rmse_0_255"]) for r in rows]
    assert all(a >= b for a, b in itertools.pairwise(rate))  # more bits received at smaller t
    assert dist[0] < dist[-1]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["rate_t1"] == pytest.approx(rate[0], rel=1e-5) and report["distortion_t1"] == pytest.approx(
        dist[0], rel=1e-5)
    # The whole bound is the rate at t = 1 plus the decoder's L_0.
    assert report["bpd"] == pytest.approx(report["rate_t1"] + report["decoder_l0"], rel=1e-5)
    png = Image.open(tmp_path / "rd.png")
    assert png.format == "PNG" and png.size[0] > 2 * png.size[1]  # three panels side by side
    assert cli([*args[:-2], "--rd-points", "5"]) == 0
    assert [int(r["t"]) for r in csv.DictReader(rd.open())] == [1, 6, 11, 15, 20]


def test_eval_rate_distortion_refuses_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = str(_checkpoint(tmp_path / "m.safetensors", trained=False))
    assert cli(["eval", "--checkpoint", ckpt, "--skip-samples", "--rate-distortion", str(tmp_path / "rd.png")]) == 2
    assert "names the CSV" in capsys.readouterr().err
    assert cli(["eval", "--checkpoint", ckpt, "--skip-bpd", "--rate-distortion", str(tmp_path / "rd.csv")]) == 2
    assert "drop --skip-bpd" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if it were not installed
    assert cli(["eval", "--checkpoint", ckpt, "--skip-samples", "--rate-distortion", str(tmp_path / "rd.csv")]) == 2
    assert "pip install 'ddpm-service[figures]'" in capsys.readouterr().err
    assert not (tmp_path / "rd.csv").exists()


def test_the_bound_clips_x0_hat_unless_told_not_to(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from model.checkpoint import load_checkpoint
    from model.evaluate import bits_per_dim

    path = _checkpoint(tmp_path / "m.safetensors", trained=True)
    images = load_dataset("digits", 8, 1, "test").images(range(10))
    ckpt = load_checkpoint(path)
    clipped, _ = bits_per_dim(ckpt, images, num_t=5)
    raw, _ = bits_per_dim(ckpt, images, num_t=5, clip_denoised=False)
    assert clipped == bits_per_dim(ckpt, images, num_t=5, clip_denoised=True)[0] and clipped != raw
    base = ["eval", "--checkpoint", str(path), "--skip-samples", "--bpd-images", "10", "--bpd-num-t", "5"]
    assert cli([*base, "--no-bound-clip", "--json", str(tmp_path / "raw.json")]) == 0
    assert "x0-hat unclipped" in capsys.readouterr().out
    assert json.loads((tmp_path / "raw.json").read_text())["bpd"] == pytest.approx(raw, rel=1e-12)
    assert cli([*base, "--json", str(tmp_path / "clipped.json")]) == 0
    assert json.loads((tmp_path / "clipped.json").read_text())["bpd"] == pytest.approx(clipped, rel=1e-12)
