"""``ddpm eval``: bits/dim on held-out data and sample-quality figures of a checkpoint.

Figures (each reported with a reference so the number means something):

- **bits/dim**: the variational bound (the paper's Eq. 5) on the dataset's held-out split, estimated without
  bias from ``num_t`` random terms per image plus the exact decoder and prior terms
  (``GaussianDiffusion.estimate_bpd``), or the full T-term bound with ``--full-bound`` (``model.bound``:
  held-out image i's q-noise from stream (seed, i), the numbers a likelihood job of the same seed and index
  gives). p's mean uses the clipped x0-hat, as the official evaluation (``model.diffusion``, "The bound").
- **rate-distortion** (``--rate-distortion CSV``): the full bound's progressive-coding curve (Fig. 5; rate
  L_T + ... + L_t and RMSE of x0-hat(x_t) at each t, ``model.bound``) as CSV and, next to it, a PNG.
- **classifier Fréchet distance** (works offline on any labelled dataset): a small CNN classifier is trained on
  the training split (or read from the cache), and the Fréchet distance between Gaussians fitted to its
  penultimate features is computed for generated samples vs the training images, next to the same figure for
  real held-out images vs the training images (the floor a perfect model would reach with that many images).
- **class histogram** of the samples under that classifier (shows whether every class is produced), next to the
  held-out images' histogram, and the classifier's held-out accuracy.
- **FID** when ``--inception-weights`` names the pytorch-fid weights file on disk (``model.inception``; nothing
  is downloaded): Inception-v3 pool features of samples vs training images, next to held-out vs training.

This module owns the evaluation figures and the small classifier; sampling, the bound and the data come from
``model.sampler``, ``model.diffusion`` and ``model.data``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from model.bound import Likelihood, curve, likelihood, rd_grid
from model.checkpoint import CheckpointError, LoadedCheckpoint, atomic_save_safetensors, load_checkpoint
from model.data import DatasetError, ImageSet, load_dataset, to_model_range
from model.images import save_png
from model.inception import FIDInception, load_fid_inception
from model.plots import MissingMatplotlib, plot_rate_distortion, require_matplotlib, write_rd_csv
from model.sampler import SAMPLERS, sample

__all__ = [
    "Classifier",
    "EvalReport",
    "bits_per_dim",
    "configure_parser",
    "frechet_distance",
    "full_bound_terms",
    "get_classifier",
    "main",
    "train_classifier",
]

log = logging.getLogger(__name__)


# ---- the Fréchet distance ------------------------------------------------------------------------------------
def _gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` of Gaussians fitted to feature rows (N, D).

    The trace of the matrix square root is the sum of the square roots of the eigenvalues of
    ``S_a^(1/2) S_b S_a^(1/2)`` (symmetric, so ``eigh`` is stable; tiny negative eigenvalues are rounding).
    """
    mu_a, s_a = _gaussian(a)
    mu_b, s_b = _gaussian(b)
    w, v = np.linalg.eigh(s_a)
    s_a_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(s_a_half @ s_b @ s_a_half), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * cross)


# ---- the feature classifier ------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """A small CNN: four 3x3 conv stages (the last three stride 2), global average pool -> 128-d features -> logits."""

    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()
        chans = [channels, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1),
                       nn.GroupNorm(8, chans[i + 1]), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, 128) pooled features."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to 1/16 of the image size (background padding): cheap augmentation."""
    max_px = x.shape[-1] // 16
    if max_px == 0:
        return x
    dx, dy = (int(v) for v in torch.randint(-max_px, max_px + 1, (2,), generator=g))
    padded = F.pad(x, (max_px, max_px, max_px, max_px), value=-1.0)
    h, w = x.shape[-2:]
    return padded[..., max_px + dy:max_px + dy + h, max_px + dx:max_px + dx + w]


def train_classifier(data: ImageSet, *, epochs: int = 15, batch_size: int = 64, lr: float = 2e-3,
                     seed: int = 0, device: torch.device | str = "cpu") -> Classifier:
    """Fit a ``Classifier`` to a labelled dataset (Adam, random shifts). Deterministic for a seed."""
    if data.labels is None or not data.num_classes:
        raise DatasetError(f"{data.name}: no labels, so no classifier features (use --inception-weights)")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Classifier(data.shape[0], data.num_classes).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            x = _shift(to_model_range(data.images(idx)), g).to(device)
            loss = F.cross_entropy(net(x), data.labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def get_classifier(data: ImageSet, cache_dir: Path | None, *, device: torch.device | str = "cpu") -> Classifier:
    """The classifier for ``data``, read from ``cache_dir`` when trained before (safetensors), else trained."""
    c, h, w = data.shape
    assert data.num_classes is not None
    path = (cache_dir / f"classifier-{data.name}-{c}x{h}x{w}-n{len(data)}.safetensors") if cache_dir else None
    if path is not None and path.is_file():
        net = Classifier(c, data.num_classes)
        net.load_state_dict(load_file(str(path)))
        return net.to(device).eval()
    t0 = time.perf_counter()
    net = train_classifier(data, device=device)
    log.info("trained the feature classifier in %.0f s", time.perf_counter() - t0)
    if path is not None:
        atomic_save_safetensors(net.state_dict(), {"what": "ddpm eval feature classifier"}, path)
    return net


@torch.no_grad()
def _features_and_classes(net: Classifier, images: torch.Tensor, device: torch.device | str,
                          batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, C, H, W) -> (features (N, 128), predicted classes (N,))."""
    feats, classes = [], []
    for i in range(0, len(images), batch):
        f = net.features(to_model_range(images[i:i + batch]).to(device))
        feats.append(f.cpu().double().numpy())
        classes.append(net.head(f).argmax(dim=1).cpu().numpy())
    return np.concatenate(feats), np.concatenate(classes)


# ---- bits/dim --------------------------------------------------------------------------------------------------
def full_bound_terms(ckpt: LoadedCheckpoint, images: torch.Tensor, *, batch: int = 256, seed: int = 0,
                     clip_denoised: bool | None = None) -> Likelihood:
    """Every term of the bound of uint8 ``images`` (N, C, H, W), on the CPU; image i's q-noise is stream (seed, i).

    ``clip_denoised``: clip x0-hat in p's mean (default: the checkpoint's, True for the paper's models).
    """
    dev = ckpt.diffusion.device
    parts = [likelihood(ckpt.unet, ckpt.diffusion, to_model_range(images[i:i + batch]).to(dev), seed=seed,
                        first_index=i, clip_denoised=clip_denoised).to("cpu")
             for i in range(0, len(images), batch)]
    return Likelihood.cat(parts)


def _mean_and_stderr(v: torch.Tensor) -> tuple[float, float]:
    v = v.double()
    return float(v.mean()), float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0


@torch.no_grad()
def bits_per_dim(ckpt: LoadedCheckpoint, images: torch.Tensor, *, num_t: int = 50, full_bound: bool = False,
                 batch: int = 256, seed: int = 0, clip_denoised: bool | None = None) -> tuple[float, float]:
    """Mean and standard error of the variational bound in bits/dim over uint8 ``images`` (N, C, H, W)."""
    if full_bound:
        terms = full_bound_terms(ckpt, images, batch=batch, seed=seed, clip_denoised=clip_denoised)
        return _mean_and_stderr(terms.bits_per_dim)
    dev = ckpt.diffusion.device
    g = torch.Generator(device=dev).manual_seed(seed)
    per_image = [ckpt.diffusion.estimate_bpd(ckpt.unet, to_model_range(images[i:i + batch]).to(dev), num_t,
                                             generator=g, clip_denoised=clip_denoised).cpu()
                 for i in range(0, len(images), batch)]
    return _mean_and_stderr(torch.cat(per_image))


# ---- the report ------------------------------------------------------------------------------------------------
@dataclass
class EvalReport:
    """Every figure ``ddpm eval`` computes; ``None`` where a figure was skipped (``notes`` says why)."""

    checkpoint: str
    dataset: str
    step: int
    bpd: float | None = None
    bpd_stderr: float | None = None
    bpd_method: str = ""
    num_samples: int = 0
    sample_steps: int = 0
    sampler: str = "ddpm"
    fd_samples_vs_train: float | None = None
    fd_heldout_vs_train: float | None = None
    classifier_accuracy: float | None = None
    sample_class_histogram: list[int] = field(default_factory=list)
    heldout_class_histogram: list[int] = field(default_factory=list)
    fid_samples_vs_train: float | None = None
    fid_heldout_vs_train: float | None = None
    rate_t1: float | None = None  # L_T + ... + L_1, bits/dim (the rate once x_1 is received)
    decoder_l0: float | None = None  # L_0, bits/dim
    distortion_t1: float | None = None  # RMSE of x0-hat(x_1), 0..255 scale
    rate_distortion_csv: str = ""
    rate_distortion_png: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [("checkpoint", f"{self.checkpoint} (step {self.step})"), ("dataset", self.dataset)]
        if self.bpd is not None:
            rows.append(("bits/dim (held-out)", f"{self.bpd:.3f} ± {self.bpd_stderr:.3f}  [{self.bpd_method}]"))
        if self.rate_t1 is not None:
            rows += [("rate L_T + ... + L_1", f"{self.rate_t1:.3f} bits/dim  (the lossy part of the code)"),
                     ("decoder L_0", f"{self.decoder_l0:.3f} bits/dim"),
                     ("distortion at t = 1", f"{self.distortion_t1:.3f} RMSE on 0..255"),
                     ("rate-distortion curve", f"{self.rate_distortion_csv}, {self.rate_distortion_png}")]
        if self.fd_samples_vs_train is not None:
            rows += [
                ("classifier FD: samples vs train",
                 f"{self.fd_samples_vs_train:.2f}  ({self.num_samples} samples, "
                 f"{self.sample_steps} {self.sampler} steps)"),
                ("classifier FD: held-out vs train", f"{self.fd_heldout_vs_train:.2f}  (reference: real images)"),
                ("classifier held-out accuracy", f"{self.classifier_accuracy:.3f}"),
                ("sample class histogram", " ".join(str(c) for c in self.sample_class_histogram)),
                ("held-out class histogram", " ".join(str(c) for c in self.heldout_class_histogram)),
            ]
        if self.fid_samples_vs_train is not None:
            rows += [("FID: samples vs train", f"{self.fid_samples_vs_train:.2f}"),
                     ("FID: held-out vs train", f"{self.fid_heldout_vs_train:.2f}  (reference: real images)")]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k.ljust(width)}  {v}" for k, v in rows] + [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _generate(ckpt: LoadedCheckpoint, n: int, steps: int, sampler: str, seed: int, batch: int = 256
              ) -> torch.Tensor:
    """``n`` samples as uint8 (N, C, H, W), images 0..n-1 of request ``seed``."""
    cfg = ckpt.unet_config
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    out = []
    for start in range(0, n, batch):
        x = sample(ckpt.unet, ckpt.diffusion, min(batch, n - start), shape, seed=seed, first_index=start,
                   steps=steps, sampler=sampler)
        out.append(((x.cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def _classifier_figures(report: EvalReport, ckpt: LoadedCheckpoint, train: ImageSet, test: ImageSet,
                        samples: torch.Tensor, args: argparse.Namespace) -> None:
    dev = ckpt.diffusion.device
    t0 = time.perf_counter()
    net = get_classifier(train, None if args.no_cache else Path(args.classifier_cache).expanduser(), device=dev)
    report.seconds["classifier"] = time.perf_counter() - t0
    f_train, _ = _features_and_classes(net, train.all_images(), dev)
    f_test, c_test = _features_and_classes(net, test.images(range(min(len(samples), len(test)))), dev)
    f_samp, c_samp = _features_and_classes(net, samples, dev)
    assert test.labels is not None and train.num_classes is not None
    report.fd_samples_vs_train = frechet_distance(f_samp, f_train)
    report.fd_heldout_vs_train = frechet_distance(f_test, f_train)
    report.classifier_accuracy = float((c_test == test.labels[:len(c_test)].numpy()).mean())
    report.sample_class_histogram = np.bincount(c_samp, minlength=train.num_classes).tolist()
    report.heldout_class_histogram = np.bincount(c_test, minlength=train.num_classes).tolist()


@torch.no_grad()
def _inception_features(net: FIDInception, images: torch.Tensor, device: torch.device, batch: int = 50
                        ) -> np.ndarray:
    return np.concatenate([net.features(to_model_range(images[i:i + batch]).to(device)).cpu().double().numpy()
                           for i in range(0, len(images), batch)])


def _fid_figures(report: EvalReport, train: ImageSet, test: ImageSet, samples: torch.Tensor,
                 args: argparse.Namespace, device: torch.device) -> None:
    t0 = time.perf_counter()
    net = load_fid_inception(args.inception_weights, device)
    n_train = min(len(train), args.fid_train_images) if args.fid_train_images else len(train)
    f_train = _inception_features(net, train.images(range(n_train)), device)
    f_test = _inception_features(net, test.images(range(min(len(samples), len(test)))), device)
    report.fid_samples_vs_train = frechet_distance(_inception_features(net, samples, device), f_train)
    report.fid_heldout_vs_train = frechet_distance(f_test, f_train)
    report.seconds["fid"] = time.perf_counter() - t0
    if len(samples) < 2048:
        report.notes.append(f"FID from {len(samples)} samples (< 2048, the feature size) is biased upwards; "
                            "compare it only with the held-out reference computed the same way")


def _sample_quality(report: EvalReport, ckpt: LoadedCheckpoint, train: ImageSet, test: ImageSet,
                    args: argparse.Namespace) -> None:
    n = args.num_samples or min(len(test), 1000)
    t0 = time.perf_counter()
    samples = _generate(ckpt, n, args.sample_steps, args.sampler, args.seed)
    report.seconds["sampling"] = time.perf_counter() - t0
    report.num_samples, report.sample_steps, report.sampler = n, args.sample_steps, args.sampler
    if args.grid:
        save_png(to_model_range(samples[:100]), args.grid)
    if train.labels is None:
        report.notes.append(f"{report.dataset} has no labels: classifier figures skipped")
    else:
        _classifier_figures(report, ckpt, train, test, samples, args)
    if args.inception_weights:
        _fid_figures(report, train, test, samples, args, ckpt.diffusion.device)
    if n > len(test):
        report.notes.append(f"held-out reference uses all {len(test)} held-out images; samples use {n} "
                            "(Fréchet distances shrink with more images)")


def _rate_distortion(report: EvalReport, ckpt: LoadedCheckpoint, images: torch.Tensor,
                     args: argparse.Namespace) -> None:
    """The full bound of ``images`` and its data-set curve (CSV + PNG); fills the report's bound figures."""
    T = ckpt.diffusion.num_timesteps
    terms = full_bound_terms(ckpt, images, seed=args.seed, clip_denoised=args.bound_clip)
    report.bpd, report.bpd_stderr = _mean_and_stderr(terms.bits_per_dim)
    points = curve(terms, rd_grid(T, args.rd_points or None))
    at_1 = curve(terms, [1])[0]
    report.rate_t1, report.distortion_t1 = at_1.rate, at_1.distortion
    report.decoder_l0 = float(terms.terms[:, 0].double().mean())
    csv_path = Path(args.rate_distortion)
    png_path = csv_path.with_suffix(".png")
    write_rd_csv(points, T, csv_path)
    plot_rate_distortion(points, T, png_path, title=f"{Path(args.checkpoint).name} on {report.dataset} "
                                                    f"({len(images)} held-out images)")
    report.rate_distortion_csv, report.rate_distortion_png = str(csv_path), str(png_path)


def evaluate(args: argparse.Namespace) -> EvalReport:
    """Run every figure asked for by ``args`` (see ``configure_parser``)."""
    if args.inception_weights and args.skip_samples:
        raise ValueError("--inception-weights computes FID of samples: drop --skip-samples")
    if args.rate_distortion:
        if args.skip_bpd:
            raise ValueError("--rate-distortion computes the full bound: drop --skip-bpd")
        if Path(args.rate_distortion).suffix.lower() != ".csv":
            raise ValueError(f"--rate-distortion names the CSV to write (the PNG goes next to it), got "
                             f"{args.rate_distortion!r}")
        require_matplotlib()  # refuse before the T forward passes, not after
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if args.inception_weights:
        load_fid_inception(args.inception_weights)  # refuse a wrong file before any work
    ckpt = load_checkpoint(args.checkpoint, device=device)
    ckpt.unet.cache_time_embeddings(ckpt.diffusion.num_timesteps)
    spec = args.dataset or ckpt.metadata["dataset"]
    cfg = ckpt.unet_config
    test = load_dataset(spec, cfg.image_size, cfg.in_channels, "test", holdout=args.holdout)
    report = EvalReport(str(args.checkpoint), spec, int(ckpt.metadata["step"]))
    if not args.skip_bpd:
        t0 = time.perf_counter()
        images = test.images(range(min(len(test), args.bpd_images))) if args.bpd_images else test.all_images()
        if args.rate_distortion:
            _rate_distortion(report, ckpt, images, args)
        else:
            report.bpd, report.bpd_stderr = bits_per_dim(ckpt, images, num_t=args.bpd_num_t,
                                                         full_bound=args.full_bound, seed=args.seed,
                                                         clip_denoised=args.bound_clip)
        full = args.full_bound or args.rate_distortion
        clip = ckpt.diffusion.clip_denoised if args.bound_clip is None else args.bound_clip
        report.bpd_method = (f"full {ckpt.diffusion.num_timesteps}-term bound" if full else
                             f"unbiased estimate, {args.bpd_num_t} random terms + decoder + prior") \
            + f", {len(images)} images" + ("" if clip else ", x0-hat unclipped")
        report.seconds["bpd"] = time.perf_counter() - t0
    if not args.skip_samples:
        train = load_dataset(spec, cfg.image_size, cfg.in_channels, "train", holdout=args.holdout)
        _sample_quality(report, ckpt, train, test, args)
    return report


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="FILE", help="a .safetensors checkpoint")
    parser.add_argument("--dataset", help="dataset spec (default: the one in the checkpoint's metadata)")
    parser.add_argument("--holdout", type=float, default=0.1, help="held-out fraction (digits/folder)")
    parser.add_argument("--bpd-num-t", type=int, default=50, help="random bound terms per image (default 50)")
    parser.add_argument("--bpd-images", type=int, default=0, help="held-out images for bits/dim (0 = all)")
    parser.add_argument("--full-bound", action="store_true", help="all T terms per image (T network passes)")
    parser.add_argument("--rate-distortion", metavar="CSV",
                        help="also write the full bound's rate-distortion curve (Fig. 5) to CSV and a PNG beside it "
                             "(implies --full-bound; the PNG needs matplotlib: pip install '.[figures]')")
    parser.add_argument("--bound-clip", action=argparse.BooleanOptionalAction, default=None,
                        help="clip x0-hat in p's mean inside the bound (default: the checkpoint's clip_denoised, "
                             "True for the paper's models, as the official evaluation)")
    parser.add_argument("--rd-points", type=int, default=0,
                        help="points of the curve, spread over t = 1..T (default 0: every t)")
    parser.add_argument("--skip-bpd", action="store_true")
    parser.add_argument("--skip-samples", action="store_true")
    parser.add_argument("--num-samples", type=int, default=0, help="samples (default: the held-out size, <=1000)")
    parser.add_argument("--sample-steps", type=int, default=100, help="respaced sampling steps (default 100)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--classifier-cache", default="~/.cache/ddpm-service",
                        help="folder caching the feature classifier")
    parser.add_argument("--no-cache", action="store_true", help="always retrain the feature classifier")
    parser.add_argument("--inception-weights", metavar="FILE",
                        help="the pytorch-fid Inception weights file (pt_inception-2015-12-05-*.pth) for FID")
    parser.add_argument("--fid-train-images", type=int, default=0,
                        help="training images for the FID statistics (0 = all)")
    parser.add_argument("--grid", metavar="PNG", help="also save the first 100 samples as a grid")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = evaluate(args)
    except (CheckpointError, DatasetError, ValueError, MissingMatplotlib) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0

