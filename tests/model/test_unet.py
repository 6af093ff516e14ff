"""The U-Net: the paper's parameter counts, shapes, zero-init, and the batch-invariant timestep table."""

from __future__ import annotations

import torch

from model.config import UNetConfig, model_preset
from model.unet import UNet


def test_cifar10_preset_has_the_papers_parameter_count() -> None:
    assert UNet(model_preset("cifar10").unet).num_parameters() == 35_746_307


def test_256_preset_has_about_114m_parameters() -> None:
    n = UNet(model_preset("256").unet).num_parameters()
    assert 113_000_000 < n < 115_000_000


def test_forward_shape_and_zero_init_output(tiny_unet_config: UNetConfig) -> None:
    unet = UNet(tiny_unet_config).eval()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 10, 49])
    eps = unet(x, t)
    assert eps.shape == (3, 3, 8, 8) and eps.dtype == torch.float32
    # conv_out is zero-initialised, so a fresh network predicts eps = 0 exactly.
    assert torch.count_nonzero(eps) == 0


def test_time_table_matches_the_direct_path(tiny_unet_config: UNetConfig) -> None:
    unet = UNet(tiny_unet_config).eval()
    for p in unet.parameters():
        p.data.normal_(0, 0.05)
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([0, 7, 20, 49])
    with torch.no_grad():
        direct = unet(x, t)
        unet.cache_time_embeddings(50)
        cached = unet(x, t)
    torch.testing.assert_close(cached, direct, rtol=0, atol=1e-6)
    unet.train()  # training drops the table
    assert all(b.temb_table is None for b in unet.res_blocks())
