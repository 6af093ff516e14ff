"""The training-state file: everything ``--resume`` needs, as safetensors tensors plus JSON metadata (no pickle).

``checkpoints/state-STEP.safetensors`` holds tensors named ``model.*`` (weights), ``ema.*`` (EMA weights),
``optim.<param>.<name>`` (Adam's moments and step counts) and ``rng.cpu`` / ``rng.cuda`` (generator states);
its metadata holds ``format``, ``format_version``, ``config`` (the run's resolved config as JSON) and ``state``
(JSON: step, EMA update count, the optimizer's param groups and non-tensor state, the data position). Written
atomically (``model.checkpoint.atomic_save_safetensors``). The servable EMA file next to it,
``ema-STEP.safetensors``, is ``model.checkpoint``'s format.

This module knows file names and the layout of the file, not the training loop.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from model.checkpoint import atomic_save_safetensors

__all__ = [
    "STATE_FORMAT",
    "STATE_VERSION",
    "ema_path",
    "latest_state",
    "optimizer_state",
    "read_state",
    "state_path",
    "write_state",
]

STATE_FORMAT = "ddpm-train-state"
STATE_VERSION = 1


def state_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"state-{step:08d}.safetensors"


def ema_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"ema-{step:08d}.safetensors"


def latest_state(run_dir: Path) -> Path | None:
    """The newest training-state file of a run, or None."""
    files = sorted((run_dir / "checkpoints").glob("state-*.safetensors"))
    return files[-1] if files else None


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """An ``optimizer.load_state_dict`` argument from the ``optim.*`` tensors and the ``optimizer`` metadata."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def read_state(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Tensors grouped by prefix (model, ema, optim, rng) and the JSON metadata of a training-state file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}, "optim": {}, "rng": {}}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                prefix, _, rest = key.partition(".")
                groups[prefix][rest if prefix != "optim" else key] = f.get_tensor(key)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable training-state file: {exc}") from None
    if raw.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a training-state file (format {raw.get('format')!r})")
    if raw.get("format_version") != str(STATE_VERSION):
        raise ValueError(f"{path}: training-state version {raw.get('format_version')!r} is not supported "
                         f"(this build reads version {STATE_VERSION})")
    return groups, json.loads(raw["state"])


def write_state(path: Path, *, model: Mapping[str, torch.Tensor], ema: Mapping[str, torch.Tensor],
                optimizer: torch.optim.Optimizer, rng: Mapping[str, torch.Tensor], config_json: str,
                state: dict[str, Any]) -> None:
    """Write one training-state file atomically; ``state`` (JSON-able) gets the optimizer's metadata added."""
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
    tensors = {f"model.{k}": v for k, v in model.items()} | {f"ema.{k}": v for k, v in ema.items()}
    tensors |= opt_tensors | {f"rng.{k}": v for k, v in rng.items()}
    meta = {"format": STATE_FORMAT, "format_version": str(STATE_VERSION), "config": config_json,
            "state": json.dumps({**state, "optimizer": opt_meta})}
    atomic_save_safetensors(tensors, meta, path)
