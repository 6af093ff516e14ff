"""Configuration dataclasses for the U-Net and the diffusion process, and the named presets.

These are plain frozen dataclasses: the checkpoint stores them as JSON (``to_dict``/``from_dict``) so a served
model is rebuilt from its file alone. Nothing here reads the environment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

# The one place each option's names are written (the service's request schemas and every CLI use these).
BetaSchedule = Literal["linear", "cosine"]
VarianceType = Literal["fixedlarge", "fixedsmall"]
SamplerName = Literal["ddpm", "ddim"]

BETA_SCHEDULES: tuple[str, ...] = get_args(BetaSchedule)
VARIANCE_TYPES: tuple[str, ...] = get_args(VarianceType)
SAMPLERS: tuple[str, ...] = get_args(SamplerName)

_T = TypeVar("_T")


def _from_dict(cls: type[_T], data: dict[str, Any]) -> _T:
    """Build a dataclass from a dict, turning lists back into tuples and refusing unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)


@dataclass(frozen=True)
class UNetConfig:
    """The paper's U-Net (official ``models/unet.py``), with the knobs needed to import diffusers models.

    ``ch * ch_mult[i]`` channels at level ``i``; ``num_res_blocks`` residual blocks per level on the way down
    (``+1`` on the way up); self-attention at the resolutions in ``attn_resolutions``.
    """

    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_groups: int = 32
    norm_eps: float = 1e-6
    # Attention heads: the paper uses one; imported diffusers models may use more.
    num_heads: int = 1
    resamp_with_conv: bool = True

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.image_size % (2 ** (len(self.ch_mult) - 1)):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**(len(ch_mult)-1) = "
                f"{2 ** (len(self.ch_mult) - 1)}"
            )
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}")
        if self.ch % 2:
            raise ValueError(f"ch must be even (sinusoidal embedding), got {self.ch}")
        for m in (1, *self.ch_mult):
            if (self.ch * m) % self.num_groups:
                raise ValueError(f"channels {self.ch * m} not divisible by num_groups {self.num_groups}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process (beta schedule) and the default reverse-process choices.

    ``variance`` is the fixed reverse variance sigma_t^2: ``fixedlarge`` = beta_t, ``fixedsmall`` = beta~_t.
    ``clip_denoised`` clips x0-hat to [-1, 1] before taking the posterior mean (the official code's default).
    """

    num_timesteps: int = 1000
    beta_schedule: BetaSchedule = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    variance: VarianceType = "fixedlarge"
    clip_denoised: bool = True

    def __post_init__(self) -> None:
        if self.num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {self.num_timesteps}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.variance not in VARIANCE_TYPES:
            raise ValueError(f"variance must be one of {VARIANCE_TYPES}, got {self.variance!r}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiffusionConfig:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class ModelPreset:
    """A named pair of configs (the training presets add optimiser settings on top of these)."""

    unet: UNetConfig
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)


MODEL_PRESETS: dict[str, ModelPreset] = {
    # The paper's CIFAR10 model: 35,746,307 parameters.
    "cifar10": ModelPreset(UNetConfig()),
    # The paper's 256x256 model (LSUN, CelebA-HQ): 114M parameters; samples with fixedsmall.
    "256": ModelPreset(
        UNetConfig(image_size=256, ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0),
        DiffusionConfig(variance="fixedsmall"),
    ),
    # CPU-sized: the bundled demo (digits upscaled to 32x32, one channel): 1.6M parameters, 6.4 MB checkpoint.
    # Few channels at 32x32 (where the compute is), more at 8x8 (with attention) and 4x4.
    "digits": ModelPreset(
        UNetConfig(image_size=32, in_channels=1, out_channels=1, ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=2,
                   attn_resolutions=(8,), dropout=0.0, num_groups=8),
    ),
    # Tiny: unit tests and smoke runs (a few hundred thousand parameters).
    "tiny": ModelPreset(
        UNetConfig(image_size=16, in_channels=3, out_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(8,), dropout=0.0, num_groups=8),
        DiffusionConfig(num_timesteps=100),
    ),
}


def model_preset(name: str) -> ModelPreset:
    """The preset called ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(MODEL_PRESETS)}") from None
