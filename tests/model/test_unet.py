"""The U-Net: the paper's parameter counts, shapes, zero-init, and the batch-invariant timestep table."""

from __future__ import annotations

import torch

from model.config import UNetConfig, model_preset
from model.unet import AttnBlock, UNet, timestep_embedding


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


def test_timestep_embedding_is_the_papers_sinusoid() -> None:
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 128)
    assert emb.shape == (3, 128)
    # [sin, cos] halves; frequency i is 10000^(-i / 63): the first is 1, the last 1e-4.
    torch.testing.assert_close(emb[:, 0], torch.sin(t.float()))
    torch.testing.assert_close(emb[:, 64], torch.cos(t.float()))
    torch.testing.assert_close(emb[:, 63], torch.sin(t.float() * 1e-4))


def test_residual_branches_and_attention_output_start_at_zero(tiny_unet_config: UNetConfig) -> None:
    unet = UNet(tiny_unet_config)
    zero_init = [n for n, p in unet.named_parameters() if not p.any()]
    # conv2 of every residual block, proj_out of every attention block, and the output conv (weights, biases).
    n_res, n_attn = len(unet.res_blocks()), sum(isinstance(m, AttnBlock) for m in unet.modules())
    assert len(zero_init) >= 2 * (n_res + n_attn + 1)
    assert all(n.endswith(("conv2.weight", "proj_out.weight", "conv_out.weight")) for n in zero_init
               if n.endswith("weight"))


def test_shapes_for_one_channel_images_and_a_scalar_timestep() -> None:
    cfg = UNetConfig(image_size=16, in_channels=1, out_channels=1, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1,
                     attn_resolutions=(8,), dropout=0.0, num_groups=4)
    unet = UNet(cfg).eval()
    eps = unet(torch.randn(2, 1, 16, 16), torch.tensor(5))
    assert eps.shape == (2, 1, 16, 16)


def test_multi_head_attention_splits_channels_into_contiguous_heads() -> None:
    block = AttnBlock(8, groups=2, eps=1e-6, num_heads=2).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(1, 8, 3, 3)
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = (m(h).reshape(2, 4, 9) for m in (block.q, block.k, block.v))  # (heads, d, HW)
        w = torch.softmax(torch.einsum("hdi,hdj->hij", q, k) / 2.0, dim=-1)  # scale d^-1/2, d = 4
        out = torch.einsum("hij,hdj->hdi", w, v).reshape(1, 8, 3, 3)
        expected = x + block.proj_out(out)
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_dropout_acts_only_in_training(tiny_unet_config: UNetConfig) -> None:
    cfg = UNetConfig(**{**tiny_unet_config.to_dict(), "dropout": 0.5})
    unet = UNet(cfg)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.1)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        assert not torch.equal(unet.train()(x, t), unet(x, t))
        unet.eval()
        assert torch.equal(unet(x, t), unet(x, t))


def test_loading_weights_drops_a_stale_time_table(tiny_unet_config: UNetConfig) -> None:
    unet = UNet(tiny_unet_config).eval()
    unet.cache_time_embeddings(50)
    other = UNet(tiny_unet_config)
    with torch.no_grad():
        for p in other.parameters():
            p.normal_(0, 0.1)
    unet.load_state_dict(other.state_dict())
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([3])
    with torch.no_grad():
        assert torch.equal(unet(x, t), other.eval()(x, t))
