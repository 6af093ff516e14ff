"""Plots and tables of the paper's curves: the rate-distortion figure (Fig. 5) as CSV and PNG.

matplotlib is an optional dependency (``pip install 'ddpm-service[figures]'``), imported only when a plot is
drawn; ``require_matplotlib`` lets a command refuse before any expensive work. PNGs are written with the Agg
backend and without a timestamp, so the same points give the same file. This module knows the
``model.bound.RDPoint`` rows, nothing of models.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any

from model.bound import RDPoint

__all__ = ["PNG_METADATA", "MissingMatplotlib", "new_figure", "plot_rate_distortion", "require_matplotlib",
           "save_figure", "write_rd_csv"]

PNG_METADATA = {"Software": None}  # no version string: the same figure gives the same bytes
INSTALL_HINT = "pip install 'ddpm-service[figures]' (or pip install 'matplotlib>=3.11,<3.12')"


class MissingMatplotlib(RuntimeError):
    """A plot was asked for and matplotlib is not installed; the message says how to install it."""


def require_matplotlib() -> None:
    """``MissingMatplotlib`` with the install command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingMatplotlib(f"plots need matplotlib: {INSTALL_HINT}") from None


def new_figure(ncols: int = 1, width: float = 4.0, height: float = 3.2, nrows: int = 1) -> tuple[Any, list[Any]]:
    """A figure of ``nrows`` x ``ncols`` axes, each ``width`` x ``height`` inches, listed row by row (Agg
    backend: no display needed)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> None:
    """Write ``fig`` as PNG (tight layout, no timestamp) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=dpi, metadata=PNG_METADATA)
    plt.close(fig)


def write_rd_csv(points: Sequence[RDPoint], num_timesteps: int, path: str | os.PathLike[str]) -> None:
    """One row per point: paper time t, reverse steps T - t, rate (bits/dim), distortion (RMSE, 0..255 scale)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["t", "reverse_steps", "rate_bits_per_dim", "distortion_rmse_0_255"])
        for p in points:
            w.writerow([p.t, num_timesteps - p.t, f"{p.rate:.6g}", f"{p.distortion:.6g}"])


def plot_rate_distortion(points: Sequence[RDPoint], num_timesteps: int, path: str | os.PathLike[str], *,
                         title: str = "") -> None:
    """The paper's Fig. 5: distortion and rate against reverse steps T - t, and distortion against rate."""
    steps = [num_timesteps - p.t for p in points]
    rate = [p.rate for p in points]
    dist = [p.distortion for p in points]
    fig, (ax_d, ax_r, ax_rd) = new_figure(3, width=3.6, height=3.0)
    ax_d.plot(steps, dist, color="tab:red")
    ax_d.set(xlabel="Reverse process steps (T - t)", ylabel="Distortion (RMSE, 0..255)")
    ax_r.plot(steps, rate, color="tab:blue")
    ax_r.set(xlabel="Reverse process steps (T - t)", ylabel="Rate (bits/dim)")
    ax_rd.plot(rate, dist, color="tab:purple")
    ax_rd.set(xlabel="Rate (bits/dim)", ylabel="Distortion (RMSE, 0..255)")
    for ax in (ax_d, ax_r, ax_rd):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
