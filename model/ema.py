"""Exponential moving average of a model's weights (the weights the paper samples from).

``shadow <- d * shadow + (1 - d) * weights`` after every optimiser step. With the paper's d = 0.9999 the average
stays near the random initial weights for thousands of steps, so the decay warms up as
``d_n = min(decay, (1 + n) / (10 + n))`` (n = updates so far) when ``warmup`` is on: short runs are usable.

Knows nothing of optimisers, data or files; its state is plain tensors plus one integer.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """The EMA of ``model``'s floating-point parameters and buffers, kept as detached tensors (same device)."""

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = float(decay), warmup
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        """The decay the next update will use."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for name, value in model.state_dict().items():
            s = self.shadow[name]
            if s.is_floating_point():
                s.lerp_(value.detach().to(s.dtype), 1.0 - d)
            else:
                s.copy_(value)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, keyed like ``model.state_dict()`` (load them into a model to sample)."""
        return self.shadow

    def load_state_dict(self, shadow: dict[str, torch.Tensor], num_updates: int) -> None:
        missing = sorted(set(self.shadow) - set(shadow))
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
        for k, v in shadow.items():
            self.shadow[k].copy_(v)
        self.num_updates = int(num_updates)
