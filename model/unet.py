"""The paper's U-Net: eps_theta(x_t, t) (Ho et al. 2020, Section 4 and Appendix B; official models/unet.py).

A PixelCNN++-style U-Net of Wide-ResNet blocks with GroupNorm and swish, a sinusoidal timestep embedding added
inside every residual block, and single-head self-attention at the 16x16 resolution. Shapes:
``x`` (B, C, H, W) in [-1, 1], ``t`` int64 (B,) in 0..T-1 -> ``eps`` (B, out_channels, H, W).

Module names follow the official code's structure (down/mid/up lists) rather than diffusers'; ``model.convert``
maps diffusers' names onto these. This module knows nothing of diffusion schedules or checkpoints.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from model.config import UNetConfig

__all__ = ["UNet", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoidal embedding of integer timesteps: (B,) -> (B, dim), ``[sin, cos]`` halves.

    Frequencies are ``exp(-ln(10000) * i / (half - 1))`` for ``i < half`` as in the official code.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _zero_(module: nn.Module) -> nn.Module:
    """Zero-initialise a layer (the official code's ``init_scale=0.``): residual branches start as identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN -> swish -> conv3x3 -> +dense(swish(temb)) -> GN -> swish -> dropout -> conv3x3(zero) ; + shortcut."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        # The official code uses a 1x1 "NIN" shortcut when the channel count changes.
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        # temb_proj(swish(temb)) for every timestep, filled by UNet.cache_time_embeddings (inference only).
        self.temb_table: torch.Tensor | None
        self.register_buffer("temb_table", None, persistent=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if temb is None:
            assert self.temb_table is not None
            proj = self.temb_table[t]
        else:
            proj = self.temb_proj(F.silu(temb))
        h = h + proj[:, :, None, None].to(h.dtype)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions: GN, 1x1 q/k/v, softmax(q k^T / sqrt(d)), zero-init output proj."""

    def __init__(self, ch: int, groups: int, eps: float, num_heads: int = 1):
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"attention channels {ch} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch, eps=eps)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = _zero_(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        nh, d = self.num_heads, c // self.num_heads

        def heads(y: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, nh, HW, d)
            return y.reshape(b, nh, d, hh * ww).transpose(2, 3)

        q, k, v = heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
        out = F.scaled_dot_product_attention(q, k, v)  # scale d^-1/2, as the paper
        out = out.transpose(2, 3).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 conv3x3 with TF "SAME" padding (pad right/bottom only), or 2x2 average pooling."""

    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then conv3x3."""

    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class Level(nn.Module):
    """One resolution of the down or up path: residual blocks, each followed by attention where configured."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        self.attns = nn.ModuleList()  # empty, or one AttnBlock per residual block
        self.resample: nn.Module | None = None


class UNet(nn.Module):
    """eps_theta(x_t, t): ``forward(x (B,C,H,W) float in [-1,1], t (B,) int64 in 0..T-1) -> (B,C_out,H,W)``."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch, temb_ch, g, eps = cfg.ch, cfg.ch * 4, cfg.num_groups, cfg.norm_eps

        def res(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, temb_ch, cfg.dropout, g, eps)

        def attn(c: int) -> AttnBlock:
            return AttnBlock(c, g, eps, cfg.num_heads)

        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        # Down path; record the channels of every activation pushed onto the skip stack.
        self.down = nn.ModuleList()
        skip_chs, cur, res_px = [ch], ch, cfg.image_size
        for i, mult in enumerate(cfg.ch_mult):
            level, out = Level(), ch * mult
            for _ in range(cfg.num_res_blocks):
                level.blocks.append(res(cur, out))
                cur = out
                if res_px in cfg.attn_resolutions:
                    level.attns.append(attn(cur))
                skip_chs.append(cur)
            if i != len(cfg.ch_mult) - 1:
                level.resample = Downsample(cur, cfg.resamp_with_conv)
                res_px //= 2
                skip_chs.append(cur)
            self.down.append(level)

        self.mid_block1, self.mid_attn, self.mid_block2 = res(cur, cur), attn(cur), res(cur, cur)

        # Up path: num_res_blocks + 1 blocks per level, each consuming one skip activation.
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            level, out = Level(), ch * mult
            for _ in range(cfg.num_res_blocks + 1):
                level.blocks.append(res(cur + skip_chs.pop(), out))
                cur = out
                if res_px in cfg.attn_resolutions:
                    level.attns.append(attn(cur))
            if i != 0:
                level.resample = Upsample(cur, cfg.resamp_with_conv)
                res_px *= 2
            self.up.insert(0, level)  # keep self.up[i] = level i, as the official code

        self.norm_out = nn.GroupNorm(g, cur, eps=eps)
        self.conv_out = _zero_(nn.Conv2d(cur, cfg.out_channels, 3, padding=1))
        self._cached_timesteps = 0

    def res_blocks(self) -> list[ResBlock]:
        return [m for m in self.modules() if isinstance(m, ResBlock)]

    @torch.no_grad()
    def cache_time_embeddings(self, num_timesteps: int) -> None:
        """Precompute every residual block's timestep projection for t in 0..num_timesteps-1 (inference).

        The time path depends on t alone, so a table makes it free per step and, unlike a matrix multiply
        whose kernel changes with the batch size, makes each image's result independent of the batch it is
        in (bit for bit on the CPU). Dropped by ``train()`` and ``load_state_dict``.
        """
        p = next(self.parameters())
        t = torch.arange(num_timesteps, device=p.device)
        temb = self.temb(timestep_embedding(t, self.config.ch).to(p.dtype))
        for block in self.res_blocks():
            block.temb_table = block.temb_proj(F.silu(temb))
        self._cached_timesteps = num_timesteps

    def clear_time_embeddings(self) -> None:
        for block in self.res_blocks():
            block.temb_table = None
        self._cached_timesteps = 0

    def train(self, mode: bool = True) -> UNet:
        if mode:
            self.clear_time_embeddings()
        return super().train(mode)

    def load_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.clear_time_embeddings()
        return super().load_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        use_table = self._cached_timesteps > 0 and not self.training
        temb = None if use_table else self.temb(timestep_embedding(t, self.config.ch).to(x.dtype))

        hs = [self.conv_in(x)]
        for level in cast(list[Level], self.down):
            for j, block in enumerate(level.blocks):
                h = block(hs[-1], temb, t)
                if len(level.attns):
                    h = level.attns[j](h)
                hs.append(h)
            if level.resample is not None:
                hs.append(level.resample(hs[-1]))

        h = self.mid_block2(self.mid_attn(self.mid_block1(hs[-1], temb, t)), temb, t)

        for level in reversed(cast(list[Level], self.up)):
            for j, block in enumerate(level.blocks):
                h = block(torch.cat([h, hs.pop()], dim=1), temb, t)
                if len(level.attns):
                    h = level.attns[j](h)
            if level.resample is not None:
                h = level.resample(h)

        return self.conv_out(F.silu(self.norm_out(h)))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
