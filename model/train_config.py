"""Training configuration: the ``TrainConfig`` dataclass, the training presets, and how overrides resolve.

A run is described by three dataclasses: ``TrainConfig`` (optimiser, data, schedule of checkpoints and
previews), ``UNetConfig`` and ``DiffusionConfig`` (``model.config``). ``resolve_config`` starts from a named
preset, applies a JSON/YAML config file, then explicit overrides (the CLI's flags), and validates the result.
The resolved ``RunConfig`` is saved as JSON with every run and read back by ``--resume``.

Nothing here reads the environment or touches the file system except ``load_config_file``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from model.config import DiffusionConfig, UNetConfig, model_preset

__all__ = [
    "TRAIN_PRESETS",
    "RunConfig",
    "TrainConfig",
    "add_override_flags",
    "load_config_file",
    "overrides_from_args",
    "resolve_config",
]

Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run that is not the network or the forward process.

    ``batch_size`` is global (split evenly over data-parallel processes). The learning rate warms up linearly
    over ``warmup_steps`` and then stays constant (the official code). EMA decay warms up as
    ``min(ema_decay, (1 + n) / (10 + n))`` when ``ema_warmup`` is on, so short runs give usable EMA weights.
    """

    dataset: str = "digits"
    steps: int = 800_000
    batch_size: int = 128
    lr: float = 2e-4
    warmup_steps: int = 5000
    grad_clip: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    random_flip: bool = True
    seed: int = 0
    # What a person watches / what is written.
    log_every: int = 50
    sample_every: int = 5000
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    num_samples: int = 64
    sample_steps: int = 100
    # Hardware.
    device: str = "auto"
    threads: int = 0  # CPU threads for torch (0 = torch's default); 1 is fastest on a shared, busy CPU
    precision: Precision = "fp32"
    compile: bool = False
    tensorboard: bool = False
    holdout: float = 0.1

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints",
                    "num_samples", "sample_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("warmup_steps and grad_clip must be >= 0 (grad_clip 0 = off)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunConfig:
    """The resolved configuration of one run: what ``ddpm train`` prints and saves as ``config.json``."""

    preset: str
    train: TrainConfig
    unet: UNetConfig
    diffusion: DiffusionConfig

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "train": self.train.to_dict(), "unet": self.unet.to_dict(),
                "diffusion": self.diffusion.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return cls(data.get("preset", "custom"), _build(TrainConfig, data["train"]),
                   UNetConfig.from_dict(data["unet"]), DiffusionConfig.from_dict(data["diffusion"]))


# The paper's hyper-parameters (docs/MATHS.md, "Training"); digits: 3,500 steps, ~50-75 min on one CPU thread.
TRAIN_PRESETS: dict[str, TrainConfig] = {
    "cifar10": TrainConfig(dataset="cifar10:data/cifar-10-python.tar.gz"),
    "256": TrainConfig(dataset="folder:data/images", lr=2e-5, batch_size=64),
    "digits": TrainConfig(dataset="digits", steps=3500, batch_size=64, lr=1e-3, warmup_steps=200,
                          ema_decay=0.998, random_flip=False, log_every=20, sample_every=1000,
                          checkpoint_every=250, keep_checkpoints=3, num_samples=64, sample_steps=100),
    "tiny": TrainConfig(dataset="digits", steps=20, batch_size=8, lr=2e-4, warmup_steps=0, ema_decay=0.9,
                        random_flip=False, log_every=5, sample_every=10, checkpoint_every=10,
                        num_samples=4, sample_steps=5),
}


def _build(cls: type[Any], data: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML config file: ``{"preset"?, "train"?: {...}, "unet"?: {...}, "diffusion"?: {...}}``.

    Top-level keys that are ``TrainConfig`` fields are accepted as train overrides too.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {p} not found")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{p}: reading YAML needs PyYAML (pip install pyyaml), or use JSON") from None
        data = yaml.safe_load(text) or {}
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping at the top level")
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {"train": dict(data.pop("train", {}) or {}), "unet": dict(data.pop("unet", {}) or {}),
                           "diffusion": dict(data.pop("diffusion", {}) or {})}
    if "preset" in data:
        out["preset"] = data.pop("preset")
    for key in list(data):
        if key in train_names:
            out["train"][key] = data.pop(key)
    if data:
        raise ValueError(f"{p}: unknown key(s) {sorted(data)}; expected preset, train, unet, diffusion "
                         "or TrainConfig fields")
    return out


def resolve_config(preset: str, file_overrides: dict[str, Any] | None = None,
                   overrides: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    """Preset, then the config file's values, then explicit overrides (``{"train"|"unet"|"diffusion": {...}}``).

    Raises ``ValueError`` naming the field for unknown names or invalid values.
    """
    file_overrides = dict(file_overrides or {})
    preset = file_overrides.pop("preset", None) or preset
    train_base = TRAIN_PRESETS.get(preset, TrainConfig())
    model = model_preset(preset)
    parts: dict[str, dict[str, Any]] = {
        "train": train_base.to_dict(), "unet": model.unet.to_dict(), "diffusion": model.diffusion.to_dict()}
    for source in (file_overrides, overrides or {}):
        for section, values in source.items():
            if section not in parts:
                raise ValueError(f"unknown config section {section!r}")
            parts[section].update(values)
    return RunConfig(preset, _build(TrainConfig, parts["train"]), UNetConfig.from_dict(parts["unet"]),
                     DiffusionConfig.from_dict(parts["diffusion"]))


# ---- command-line flags for every field -------------------------------------------------------------------
_SECTIONS: dict[str, type[Any]] = {"train": TrainConfig, "unet": UNetConfig, "diffusion": DiffusionConfig}


def _flag_for(section: str, name: str) -> str:
    return f"--{name.replace('_', '-')}" if section == "train" else f"--{section}-{name.replace('_', '-')}"


def _tuple_of_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_override_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field: ``--lr`` (train), ``--unet-ch``, ``--diffusion-num-timesteps``...; default None = unset."""
    for section, cls in _SECTIONS.items():
        group = parser.add_argument_group(f"{section} overrides (default: the preset's value)")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint, flag, dest = hints[f.name], _flag_for(section, f.name), f"{section}__{f.name}"
            if hint is bool:
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None)
            elif typing.get_origin(hint) is tuple:
                group.add_argument(flag, dest=dest, type=_tuple_of_ints, default=None, metavar="N,N,..")
            elif typing.get_origin(hint) is typing.Literal:
                group.add_argument(flag, dest=dest, choices=typing.get_args(hint), default=None)
            else:
                group.add_argument(flag, dest=dest, type=hint, default=None, metavar=f.name.upper())


def overrides_from_args(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The flags a user gave (not None), as ``{"train"|"unet"|"diffusion": {field: value}}``."""
    out: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for key, value in vars(args).items():
        if "__" in key and value is not None:
            section, name = key.split("__", 1)
            out[section][name] = value
    return out

