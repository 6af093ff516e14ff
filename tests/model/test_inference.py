"""The fast inference path on the CPU: defaults per device, what each option may change (precision, layout) and
what it may not (shapes, dtype of eps, final images beyond a small tolerance), graph buckets, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import inference
from model.config import UNetConfig
from model.diffusion import GaussianDiffusion
from model.images import to_uint8
from model.inference import InferenceOptions, buckets, default_options, prepare
from model.sampler import sample
from model.unet import UNet

CFG = UNetConfig(image_size=8, in_channels=3, out_channels=3, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(4,), dropout=0.0, num_groups=4)
T = 40


def tiny_unet() -> UNet:
    """The same small random weights every call (non-zero output layers, so eps is not 0)."""
    gen = torch.Generator().manual_seed(1234)
    unet = UNet(CFG)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    unet.eval().cache_time_embeddings(T)
    return unet


def final_images(options: InferenceOptions, steps: int = T) -> torch.Tensor:
    eps_fn = prepare(tiny_unet(), options, "cpu")
    diffusion = GaussianDiffusion(torch.linspace(1e-4, 0.1, T, dtype=torch.float64))
    return sample(eps_fn, diffusion, 4, (3, 8, 8), seed=3, steps=steps)


def test_defaults_are_bf16_channels_last_on_cuda_and_bf16_only_on_a_cpu_with_bf16_instructions(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    cpu = default_options("cpu")
    assert (cpu.precision, cpu.channels_last, cpu.compile, cpu.cuda_graphs) == ("fp32", False, False, False)
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    cpu = default_options("cpu")
    assert (cpu.precision, cpu.channels_last, cpu.compile, cpu.cuda_graphs) == ("bf16", False, False, False)
    cuda = default_options("cuda", max_batch_size=128)
    assert (cuda.precision, cuda.channels_last, cuda.compile, cuda.cuda_graphs) == ("bf16", True, False, False)
    assert cuda.max_batch_size == 128 and cuda.describe() == "bf16+channels_last"


def test_eps_is_fp32_contiguous_and_shaped_like_x_with_every_cpu_option() -> None:
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 17, 39])
    for options in (InferenceOptions(), InferenceOptions(precision="bf16"), InferenceOptions(channels_last=True),
                    InferenceOptions(precision="bf16", channels_last=True)):
        eps = prepare(tiny_unet(), options, "cpu")(x, t)
        assert eps.shape == x.shape and eps.dtype == torch.float32 and eps.is_contiguous(), options
        assert not eps.requires_grad and eps.abs().sum() > 0


def test_channels_last_gives_the_same_final_images_as_fp32() -> None:
    ref, cl = final_images(InferenceOptions()), final_images(InferenceOptions(channels_last=True))
    assert (cl - ref).abs().max() < 1e-4
    assert np.array_equal(to_uint8(cl), to_uint8(ref)) or np.abs(to_uint8(cl).astype(int) - to_uint8(ref)).max() <= 1


def test_bf16_autocast_final_images_stay_close_to_fp32() -> None:
    ref = final_images(InferenceOptions())
    for options in (InferenceOptions(precision="bf16"), InferenceOptions(precision="bf16", channels_last=True)):
        x = final_images(options)
        d = (x - ref).abs()
        levels = np.abs(to_uint8(x).astype(int) - to_uint8(ref).astype(int))
        # Measured on this model (40 ancestral steps): max 0.0044 / mean 0.0003 in [-1, 1]; at most 1 uint8 level.
        assert d.max() < 0.05 and d.mean() < 0.005, (d.max(), d.mean())
        assert levels.max() <= 6 and levels.mean() < 0.5
        assert d.max() > 0  # bf16 really ran: it is not bit-identical to fp32


def test_cuda_graphs_are_switched_off_without_cuda() -> None:
    eps_fn = prepare(tiny_unet(), InferenceOptions(cuda_graphs=True), "cpu")
    assert eps_fn.options.cuda_graphs is False
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(eps_fn(x, torch.tensor([5, 6])), prepare(tiny_unet(), InferenceOptions(), "cpu")(
        x, torch.tensor([5, 6])))


def test_graph_buckets_are_powers_of_two_up_to_the_max_batch() -> None:
    assert buckets(1) == [1]
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets(48) == [1, 2, 4, 8, 16, 32, 48]


def test_unknown_precision_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="fp32"):
        InferenceOptions(precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_batch_size"):
        InferenceOptions(max_batch_size=0)
