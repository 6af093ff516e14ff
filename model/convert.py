"""Import of diffusers-format DDPM folders (UNet2DModel + DDPMScheduler) into our checkpoint.

``ddpm import-diffusers DIR --out FILE`` reads, from ``DIR`` or its ``unet/`` and ``scheduler/`` subfolders
(the hub layout of google/ddpm-cifar10-32, ddpm-ema-church-256...):

- ``config.json`` of a ``UNet2DModel`` -> ``UNetConfig`` (only the paper's layout: positional time embedding
  with ``freq_shift`` 1 and ``flip_sin_to_cos`` false, conv resampling with ``downsample_padding`` 0, the same
  attention resolutions on both paths, default time scale-shift...); anything else is refused by name;
- ``diffusion_pytorch_model.safetensors`` (or ``.bin``, loaded with ``weights_only=True``) -> our weight names,
  accepting both attention namings (``query/key/value/proj_attn`` and ``to_q/to_k/to_v/to_out.0``) and turning
  diffusers' ``Linear`` attention weights (out, in) into our 1x1 convolutions (out, in, 1, 1);
- ``scheduler_config.json`` -> ``DiffusionConfig`` (linear or ``squaredcos_cap_v2`` betas, ``fixed_large`` /
  ``fixed_small`` variance, ``clip_sample``).

Every problem raises ``ConversionError`` naming the file and what is wrong. This module reads files and writes
one checkpoint; it never imports diffusers (which is a test-only reference).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from model.checkpoint import save_checkpoint
from model.config import DiffusionConfig, UNetConfig
from model.unet import UNet

__all__ = [
    "ConversionError",
    "DiffusersFolder",
    "configure_parser",
    "convert_state_dict",
    "diffusers_config_from_unet",
    "diffusion_config_from_diffusers",
    "import_diffusers",
    "locate_files",
    "main",
    "unet_config_from_diffusers",
]

log = logging.getLogger(__name__)

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# Our ResBlock / AttnBlock sub-module names -> diffusers' (several candidates for the two attention namings).
_RES_NAMES = {"norm1": ("norm1",), "conv1": ("conv1",), "temb_proj": ("time_emb_proj",), "norm2": ("norm2",),
              "conv2": ("conv2",), "shortcut": ("conv_shortcut",)}
_ATTN_NAMES = {"norm": ("group_norm",), "q": ("to_q", "query"), "k": ("to_k", "key"), "v": ("to_v", "value"),
               "proj_out": ("to_out.0", "proj_attn")}


class ConversionError(Exception):
    """A diffusers folder that cannot be imported: a missing file, an unsupported config, unmatched weights."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class DiffusersFolder:
    """The three files of a diffusers DDPM folder."""

    unet_config: Path
    weights: Path
    scheduler_config: Path


def _first_existing(candidates: list[Path]) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


def locate_files(folder: str | Path) -> DiffusersFolder:
    """Find the U-Net config, weights and scheduler config, flat or in ``unet/`` and ``scheduler/``."""
    root = Path(folder)
    if not root.is_dir():
        raise ConversionError(root, "not a folder (expected a diffusers DDPM folder)")
    unet_dirs = [root / "unet", root]
    config = _first_existing([d / "config.json" for d in unet_dirs])
    if config is None:
        raise ConversionError(root, "no UNet2DModel config.json (looked in unet/ and the folder itself)")
    weights = _first_existing([config.parent / name for name in WEIGHT_FILES])
    if weights is None:
        raise ConversionError(config.parent, f"no weights file ({' or '.join(WEIGHT_FILES)})")
    scheduler = _first_existing([root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"])
    if scheduler is None:
        raise ConversionError(root, "no scheduler_config.json (looked in scheduler/ and the folder itself)")
    return DiffusersFolder(config, weights, scheduler)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(path, f"not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConversionError(path, "expected a JSON object")
    return data


# ---- configs ----------------------------------------------------------------------------------------------------
def _require(cfg: dict[str, Any], source: str | Path, key: str, allowed: tuple[Any, ...], default: Any) -> None:
    value = cfg.get(key, default)
    if value not in allowed:
        raise ConversionError(source, f"{key}={value!r} cannot be represented by our U-Net (supported: "
                                      f"{', '.join(repr(a) for a in allowed)})")


def _check_unet_layout(cfg: dict[str, Any], source: str | Path) -> None:
    """Refuse every UNet2DModel option that changes the network away from the paper's layout."""
    _require(cfg, source, "_class_name", ("UNet2DModel",), "UNet2DModel")
    _require(cfg, source, "time_embedding_type", ("positional",), "positional")
    _require(cfg, source, "freq_shift", (1,), 0)
    _require(cfg, source, "flip_sin_to_cos", (False,), True)
    _require(cfg, source, "downsample_padding", (0,), 1)
    _require(cfg, source, "resnet_time_scale_shift", ("default",), "default")
    _require(cfg, source, "act_fn", ("silu", "swish"), "silu")
    _require(cfg, source, "center_input_sample", (False,), False)
    _require(cfg, source, "mid_block_type", ("UNetMidBlock2D",), "UNetMidBlock2D")
    _require(cfg, source, "mid_block_scale_factor", (1, 1.0), 1)
    _require(cfg, source, "add_attention", (True,), True)
    _require(cfg, source, "downsample_type", ("conv",), "conv")
    _require(cfg, source, "upsample_type", ("conv",), "conv")
    _require(cfg, source, "class_embed_type", (None,), None)
    _require(cfg, source, "num_class_embeds", (None,), None)
    boc = cfg.get("block_out_channels")
    if cfg.get("time_embedding_dim") not in (None, 4 * boc[0] if boc else None):
        raise ConversionError(source, f"time_embedding_dim={cfg['time_embedding_dim']} must be 4 x "
                                      "block_out_channels[0] (the paper's layout)")
    if cfg.get("attn_norm_num_groups") not in (None, cfg.get("norm_num_groups", 32)):
        raise ConversionError(source, "attn_norm_num_groups differs from norm_num_groups (unsupported)")


def _attention_levels(block_types: list[str], attn_type: str, plain_type: str, source: str | Path,
                      key: str) -> list[bool]:
    flags = []
    for name in block_types:
        if name not in (attn_type, plain_type):
            raise ConversionError(source, f"{key} contains {name!r}; only {plain_type} and {attn_type} "
                                          "can be represented")
        flags.append(name == attn_type)
    return flags


def _num_heads(cfg: dict[str, Any], attn_channels: list[int], source: str | Path) -> int:
    """diffusers gives the head *width* (``attention_head_dim``; None = one head); we need one head count."""
    head_dim = cfg.get("attention_head_dim", 8)
    if head_dim is None:
        return 1
    counts = {c // int(head_dim) for c in attn_channels if c % int(head_dim) == 0}
    if len(counts) != 1 or any(c % int(head_dim) for c in attn_channels):
        raise ConversionError(source, f"attention_head_dim={head_dim} gives different head counts for the "
                                      f"attention channels {sorted(set(attn_channels))}; our U-Net uses one count")
    return counts.pop()


def unet_config_from_diffusers(cfg: dict[str, Any], *, source: str | Path = "config.json",
                               image_size: int | None = None) -> UNetConfig:
    """Map a UNet2DModel config (parsed config.json) onto ``UNetConfig``; ``ConversionError`` if impossible.

    ``dropout`` is taken from the config when present (diffusers' default 0.0 otherwise).
    """
    _check_unet_layout(cfg, source)
    boc = [int(c) for c in cfg.get("block_out_channels", (224, 448, 672, 896))]
    ch = boc[0]
    if any(c % ch for c in boc):
        raise ConversionError(source, f"block_out_channels {boc} are not multiples of the first ({ch})")
    down = _attention_levels(list(cfg.get("down_block_types", ())), "AttnDownBlock2D", "DownBlock2D", source,
                             "down_block_types")
    up = _attention_levels(list(cfg.get("up_block_types", ())), "AttnUpBlock2D", "UpBlock2D", source,
                           "up_block_types")
    if len(down) != len(boc) or len(up) != len(boc):
        raise ConversionError(source, "down_block_types, up_block_types and block_out_channels differ in length")
    if down != up[::-1]:
        raise ConversionError(source, "attention sits at different resolutions on the down and up paths "
                                      "(our U-Net uses the same attention resolutions both ways)")
    size = image_size if image_size is not None else cfg.get("sample_size")
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ConversionError(source, f"non-square sample_size {size} is not supported")
        size = size[0]
    if not isinstance(size, int):
        raise ConversionError(source, f"sample_size={size!r}: give the image size explicitly (--image-size)")
    attn_levels = [i for i, a in enumerate(down) if a]
    try:
        return UNetConfig(
            image_size=size,
            in_channels=int(cfg.get("in_channels", 3)),
            out_channels=int(cfg.get("out_channels", 3)),
            ch=ch,
            ch_mult=tuple(c // ch for c in boc),
            num_res_blocks=int(cfg.get("layers_per_block", 2)),
            attn_resolutions=tuple(size // 2**i for i in attn_levels),
            dropout=float(cfg.get("dropout", 0.0)),
            num_groups=int(cfg.get("norm_num_groups", 32)),
            norm_eps=float(cfg.get("norm_eps", 1e-5)),
            num_heads=_num_heads(cfg, [boc[i] for i in attn_levels] + [boc[-1]], source),
        )
    except (ValueError, TypeError) as exc:
        raise ConversionError(source, f"unsupported U-Net config: {exc}") from None


def diffusers_config_from_unet(cfg: UNetConfig) -> dict[str, Any]:
    """The inverse of ``unet_config_from_diffusers``: the ``UNet2DModel`` config of the same network, in the layout
    the paper's released models use (google/ddpm-*: attention blocks at ``attn_resolutions`` on both paths,
    sinusoidal embedding with ``freq_shift`` 1 and sin first, no downsample padding). One attention head only (the
    paper's; diffusers sizes heads per level, which ``UNetConfig`` cannot say)."""
    if cfg.num_heads != 1:
        raise ValueError(f"num_heads={cfg.num_heads}: only one-head U-Nets have a single diffusers config here")
    res = [cfg.image_size // 2**i for i in range(len(cfg.ch_mult))]
    return {
        "sample_size": cfg.image_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "down_block_types": ["AttnDownBlock2D" if r in cfg.attn_resolutions else "DownBlock2D" for r in res],
        "up_block_types": ["AttnUpBlock2D" if r in cfg.attn_resolutions else "UpBlock2D" for r in reversed(res)],
        "layers_per_block": cfg.num_res_blocks, "freq_shift": 1, "flip_sin_to_cos": False, "downsample_padding": 0,
        "norm_eps": cfg.norm_eps, "norm_num_groups": cfg.num_groups, "attention_head_dim": None,
        "dropout": cfg.dropout,
    }


_BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
_VARIANCES = {"fixed_large": "fixedlarge", "fixed_large_log": "fixedlarge", "fixed_small": "fixedsmall",
              "fixed_small_log": "fixedsmall"}


def diffusion_config_from_diffusers(cfg: dict[str, Any], *, source: str | Path = "scheduler_config.json"
                                    ) -> DiffusionConfig:
    """Map a DDPMScheduler config onto ``DiffusionConfig`` (missing keys take DDPMScheduler's defaults)."""
    _require(cfg, source, "beta_schedule", tuple(_BETA_SCHEDULES), "linear")
    _require(cfg, source, "variance_type", tuple(_VARIANCES), "fixed_small")
    _require(cfg, source, "prediction_type", ("epsilon",), "epsilon")
    _require(cfg, source, "thresholding", (False,), False)
    _require(cfg, source, "rescale_betas_zero_snr", (False,), False)
    _require(cfg, source, "trained_betas", (None,), None)
    if cfg.get("clip_sample", True) and float(cfg.get("clip_sample_range", 1.0)) != 1.0:
        raise ConversionError(source, f"clip_sample_range={cfg['clip_sample_range']} (only 1.0 is supported)")
    try:
        return DiffusionConfig(
            num_timesteps=int(cfg.get("num_train_timesteps", 1000)),
            beta_schedule=_BETA_SCHEDULES[cfg.get("beta_schedule", "linear")],  # type: ignore[arg-type]
            beta_start=float(cfg.get("beta_start", 1e-4)),
            beta_end=float(cfg.get("beta_end", 0.02)),
            variance=_VARIANCES[cfg.get("variance_type", "fixed_small")],  # type: ignore[arg-type]
            clip_denoised=bool(cfg.get("clip_sample", True)),
        )
    except (ValueError, TypeError) as exc:
        raise ConversionError(source, f"unsupported scheduler config: {exc}") from None


# ---- weights ----------------------------------------------------------------------------------------------------
def load_diffusers_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a ``.safetensors`` or ``.bin`` file (the latter with ``weights_only=True``)."""
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            return load_file(str(p))
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors' own error, OSError, EOFError, pickle.UnpicklingError (refusal)...
        raise ConversionError(p, f"could not read the weights (truncated, corrupt or not plain tensors): "
                                 f"{exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(p, "expected a flat dict of tensors")
    return state


def _diffusers_candidates(key: str, num_levels: int) -> tuple[str, ...]:
    """The diffusers name(s) of our parameter ``key`` (several for the two attention namings)."""
    module, leaf = key.rsplit(".", 1)
    fixed = {"temb.0": "time_embedding.linear_1", "temb.2": "time_embedding.linear_2", "conv_in": "conv_in",
             "conv_out": "conv_out", "norm_out": "conv_norm_out"}
    if module in fixed:
        return (f"{fixed[module]}.{leaf}",)
    m = re.fullmatch(r"(down|up)\.(\d+)\.(blocks|attns)\.(\d+)\.(\w+)", module)
    if m:
        path, level, kind, j, sub = m.groups()
        block = int(level) if path == "down" else num_levels - 1 - int(level)
        names = _RES_NAMES if kind == "blocks" else _ATTN_NAMES
        group = "resnets" if kind == "blocks" else "attentions"
        return tuple(f"{path}_blocks.{block}.{group}.{j}.{n}.{leaf}" for n in names.get(sub, ()))
    m = re.fullmatch(r"(down|up)\.(\d+)\.resample\.conv", module)
    if m:
        path, level = m.groups()
        block = int(level) if path == "down" else num_levels - 1 - int(level)
        return (f"{path}_blocks.{block}.{path}samplers.0.conv.{leaf}",)
    m = re.fullmatch(r"(mid_block1|mid_block2|mid_attn)\.(\w+)", module)
    if m:
        part, sub = m.groups()
        if part == "mid_attn":
            return tuple(f"mid_block.attentions.0.{n}.{leaf}" for n in _ATTN_NAMES.get(sub, ()))
        return tuple(f"mid_block.resnets.{int(part[-1]) - 1}.{n}.{leaf}" for n in _RES_NAMES.get(sub, ()))
    return ()


def convert_state_dict(state: dict[str, torch.Tensor], config: UNetConfig, *, source: str | Path = "weights"
                       ) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet2DModel state dict to our ``UNet(config)`` names and shapes (float32).

    Every one of our tensors must be found and every diffusers tensor used, with matching sizes.
    """
    ours = UNet(config).state_dict()
    num_levels, out, used = len(config.ch_mult), {}, set()
    missing, wrong = [], []
    for key, target in ours.items():
        name = next((c for c in _diffusers_candidates(key, num_levels) if c in state), None)
        if name is None:
            missing.append(_diffusers_candidates(key, num_levels)[:1] or (key,))
            continue
        tensor = state[name]
        if tensor.shape != target.shape:
            # diffusers attention projections are Linear (out, in); ours are 1x1 convs (out, in, 1, 1).
            if tensor.dim() == 2 and target.dim() == 4 and tensor.shape == target.shape[:2]:
                tensor = tensor[:, :, None, None]
            else:
                wrong.append(f"{name} {tuple(tensor.shape)} != {tuple(target.shape)}")
                continue
        out[key] = tensor.to(torch.float32).contiguous()
        used.add(name)
    unmatched = sorted(set(state) - used)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s) (e.g. {', '.join(m[0] for m in missing[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape (e.g. {'; '.join(wrong[:3])})")
    if unmatched:
        problems.append(f"{len(unmatched)} unmatched tensor(s) (e.g. {', '.join(unmatched[:3])})")
    if problems:
        raise ConversionError(source, "weights do not match the config: " + "; ".join(problems))
    return out


# ---- the command ------------------------------------------------------------------------------------------------
def source_name(folder: str | Path) -> str:
    """A readable model name: the folder name, or ``owner/name`` for a hub cache snapshot folder."""
    p = Path(folder).resolve()
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name.removeprefix("models--").replace("--", "/")
    return p.name


def import_diffusers(folder: str | Path, out: str | Path, *, dataset: str = "unknown",
                     image_size: int | None = None) -> dict[str, Any]:
    """Convert the diffusers DDPM in ``folder`` into our checkpoint at ``out``; returns what was written."""
    files = locate_files(folder)
    unet_config = unet_config_from_diffusers(_read_json(files.unet_config), source=files.unet_config,
                                             image_size=image_size)
    diffusion_config = diffusion_config_from_diffusers(_read_json(files.scheduler_config),
                                                       source=files.scheduler_config)
    state = convert_state_dict(load_diffusers_weights(files.weights), unet_config, source=files.weights)
    name = source_name(folder)
    says_ema = "ema" in re.split(r"[^a-z0-9]+", name.lower())
    extra = {"source": "diffusers", "source_folder": name, "ema": "true" if says_ema else "unknown"}
    save_checkpoint(out, state, unet_config, diffusion_config, dataset=dataset, ema=says_ema, extra=extra)
    log.info("converted %s (%s weights) into %s", name, files.weights.name, out)
    return {"unet_config": unet_config, "diffusion_config": diffusion_config, "extra": extra}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR", help="diffusers DDPM folder (UNet2DModel + DDPMScheduler)")
    parser.add_argument("--out", required=True, metavar="FILE", help="checkpoint to write (.safetensors)")
    parser.add_argument("--dataset", default="unknown", help="dataset name stored in the metadata")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image size, when config.json has no sample_size")


def main(args: argparse.Namespace) -> int:
    try:
        result = import_diffusers(args.folder, args.out, dataset=args.dataset, image_size=args.image_size)
    except ConversionError as exc:
        log.error("%s", exc)
        return 2
    cfg = result["unet_config"]
    print(f"wrote {args.out}: {cfg.image_size}x{cfg.image_size}, {UNet(cfg).num_parameters():,} parameters, "
          f"{result['diffusion_config'].num_timesteps} timesteps, {result['diffusion_config'].variance}")
    return 0
