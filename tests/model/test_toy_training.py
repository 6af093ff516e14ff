"""A tiny U-Net trained briefly on a toy distribution learns: L_simple and the bits/dim bound both go down.

The data are 8x8 one-channel images drawn from four fixed binary patterns (stripes, checkerboard, a square),
so 200 Adam steps are enough to see the network learn the distribution, on two CPU cores.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from model.config import DiffusionConfig, UNetConfig
from model.diffusion import GaussianDiffusion
from model.unet import UNet


def patterns() -> torch.Tensor:
    """Four 8x8 images in {-1, 1} (on the 8-bit grid): (4, 1, 8, 8)."""
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    square = ((i >= 2) & (i < 6) & (j >= 2) & (j < 6))
    stack = torch.stack([i % 2 == 0, j % 2 == 0, (i + j) % 2 == 0, square]).float()
    return (stack * 2 - 1)[:, None]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is several times faster than two fighting over shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_training_lowers_the_loss_and_the_bits_per_dim() -> None:
    torch.manual_seed(0)
    config = UNetConfig(image_size=8, in_channels=1, out_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                        attn_resolutions=(4,), dropout=0.0, num_groups=4)
    unet = UNet(config)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=40))
    data = patterns()
    gen = torch.Generator().manual_seed(1)
    # A fixed evaluation batch: every pattern twice, fixed t and noise for the loss, fixed noise for the bound.
    x_eval = data.repeat(2, 1, 1, 1)
    t_eval = torch.randint(0, 40, (8,), generator=gen)
    noise_eval = torch.randn(x_eval.shape, generator=gen)

    def evaluate() -> tuple[float, float]:
        unet.eval()
        with torch.no_grad():
            loss = diffusion.training_losses(unet, x_eval, t_eval, noise_eval).mean().item()
        bpd = diffusion.calc_bpd_loop(unet, x_eval, generator=torch.Generator().manual_seed(2)).total.mean()
        unet.train()
        return loss, bpd.item()

    loss_before, bpd_before = evaluate()
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    for _ in range(200):
        x0 = data[torch.randint(0, 4, (16,), generator=gen)]
        t = torch.randint(0, 40, (16,), generator=gen)
        loss = diffusion.training_losses(unet, x0, t, torch.randn(x0.shape, generator=gen)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss_after, bpd_after = evaluate()

    assert loss_before > 0.9  # a fresh network predicts eps = 0: loss = E[noise^2] = 1
    assert loss_after < 0.5 * loss_before
    assert bpd_after < 0.7 * bpd_before
