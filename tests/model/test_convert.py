"""``ddpm import-diffusers``: diffusers DDPM folders give the same network, schedule and reverse step as ours.

diffusers is the test-only reference. Models are tiny random UNet2DModels in the paper's layout (as
google/ddpm-cifar10-32 but small), with every weight randomised, including the zero-initialised ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import load_checkpoint
from model.config import DiffusionConfig, model_preset
from model.convert import (
    ConversionError,
    diffusers_config_from_unet,
    diffusion_config_from_diffusers,
    import_diffusers,
    unet_config_from_diffusers,
)
from model.diffusion import GaussianDiffusion
from model.unet import UNet
from service.cli import main as cli_main

diffusers = pytest.importorskip("diffusers")

# The hub config of google/ddpm-cifar10-32 (the keys that matter), plus the paper's dropout.
CIFAR10_DIFFUSERS = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2, "freq_shift": 1, "flip_sin_to_cos": False, "downsample_padding": 0,
    "norm_eps": 1e-6, "norm_num_groups": 32, "attention_head_dim": None, "act_fn": "silu",
    "center_input_sample": False, "time_embedding_type": "positional", "mid_block_scale_factor": 1,
    "resnet_time_scale_shift": "default", "dropout": 0.1,
}


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A two-level DDPM-layout U-Net: attention at 8x8 on both paths (second level), 16x16 images."""
    cfg: dict[str, Any] = {
        "sample_size": 16, "in_channels": 3, "out_channels": 3, "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1, "freq_shift": 1, "flip_sin_to_cos": False, "downsample_padding": 0,
        "norm_eps": 1e-6, "norm_num_groups": 8, "attention_head_dim": None,
    }
    cfg.update(overrides)
    return cfg


def random_unet2d(cfg: dict[str, Any], seed: int = 0) -> Any:
    """A UNet2DModel with every parameter random (GroupNorm scales around 1, the rest around 0)."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p) / max(1.0, p[0].numel() ** 0.5) ** 0.5)
    return model


def write_folder(folder: Path, model: Any, *, layout: str = "hub", safe: bool = True,
                 scheduler: dict[str, Any] | None = None) -> Path:
    unet_dir = folder / "unet" if layout == "hub" else folder
    sched_dir = folder / "scheduler" if layout == "hub" else folder
    model.save_pretrained(unet_dir, safe_serialization=safe)
    diffusers.DDPMScheduler(**(scheduler or {"variance_type": "fixed_large"})).save_pretrained(sched_dir)
    return folder


def to_legacy_attention_names(weights: Path) -> None:
    """Rewrite a saved file with the old attention names (query/key/value/proj_attn)."""
    state = load_file(str(weights))
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    legacy = {}
    for key, value in state.items():
        for new, old in renames.items():
            key = key.replace(new, old)
        legacy[key] = value
    assert any(".query." in k for k in legacy)
    save_file(legacy, str(weights))


def assert_same_eps(model: Any, ckpt_path: Path, batch: int = 3) -> None:
    ckpt = load_checkpoint(ckpt_path)
    size, ch = ckpt.unet_config.image_size, ckpt.unet_config.in_channels
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, ch, size, size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    with torch.no_grad():
        ref = model(x, t).sample
        ours = ckpt.unet(x, t)
    assert ref.abs().max() > 0.1  # the comparison is not vacuous (no zero-initialised output layer)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("layout", "safe", "legacy"), [("hub", True, False), ("flat", True, True),
                                                        ("hub", False, False)])
def test_imported_unet_matches_diffusers(tmp_path: Path, layout: str, safe: bool, legacy: bool) -> None:
    model = random_unet2d(tiny_config())
    folder = write_folder(tmp_path / "ddpm-tiny", model, layout=layout, safe=safe)
    if legacy:
        to_legacy_attention_names(folder / "diffusion_pytorch_model.safetensors")
    out = tmp_path / "tiny.safetensors"
    import_diffusers(folder, out)
    assert_same_eps(model, out)


def test_multi_head_attention_and_32_groups_match_diffusers(tmp_path: Path) -> None:
    cfg = tiny_config(block_out_channels=[32, 64, 64], down_block_types=["DownBlock2D", "AttnDownBlock2D",
                      "DownBlock2D"], up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
                      norm_num_groups=32, attention_head_dim=32, layers_per_block=2)
    model = random_unet2d(cfg, seed=3)
    out = tmp_path / "heads.safetensors"
    import_diffusers(write_folder(tmp_path / "m", model), out)
    assert load_checkpoint(out).unet_config.num_heads == 2
    assert_same_eps(model, out, batch=2)


def test_cifar10_diffusers_config_is_our_cifar10_preset() -> None:
    ours = unet_config_from_diffusers(CIFAR10_DIFFUSERS)
    assert ours == model_preset("cifar10").unet
    # Same architecture, counted by both libraries (building the diffusers model takes about a second).
    ref = diffusers.UNet2DModel(**CIFAR10_DIFFUSERS)
    assert sum(p.numel() for p in ref.parameters()) == UNet(ours).num_parameters() == 35_746_307


@pytest.mark.parametrize("preset", ["cifar10", "256", "digits", "tiny"])
def test_our_config_as_diffusers_maps_back_to_itself(preset: str) -> None:
    ours = model_preset(preset).unet
    theirs = diffusers_config_from_unet(ours)
    assert unet_config_from_diffusers(theirs) == ours
    if preset == "cifar10":  # the published google/ddpm-cifar10-32 config, key for key
        assert theirs == {k: v for k, v in CIFAR10_DIFFUSERS.items() if k in theirs}


def test_church_256_diffusers_config_is_our_256_preset() -> None:
    # google/ddpm-ema-church-256: six levels, attention at 16x16 (fifth level down, second level up).
    church = {**CIFAR10_DIFFUSERS, "sample_size": 256, "block_out_channels": [128, 128, 256, 256, 512, 512],
              "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4, "dropout": 0.0}
    assert unet_config_from_diffusers(church) == model_preset("256").unet
    sched = diffusion_config_from_diffusers({"variance_type": "fixed_small", "num_train_timesteps": 1000})
    assert sched == model_preset("256").diffusion


def test_cli_import_writes_a_loadable_checkpoint_with_provenance(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "ddpm-ema-tiny-16", random_unet2d(tiny_config()),
                          scheduler={"variance_type": "fixed_small", "clip_sample": False})
    out = tmp_path / "ema.safetensors"
    assert cli_main(["import-diffusers", str(folder), "--out", str(out), "--dataset", "toy"]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.metadata["ema"] is True and ckpt.metadata["dataset"] == "toy"
    assert ckpt.metadata["extra"]["source_folder"] == "ddpm-ema-tiny-16"
    assert ckpt.diffusion_config.variance == "fixedsmall" and ckpt.diffusion_config.clip_denoised is False


# ---- refusals --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("override", "named"), [
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"flip_sin_to_cos": True}, "flip_sin_to_cos"),
    ({"freq_shift": 0}, "freq_shift"),
    ({"downsample_padding": 1}, "downsample_padding"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type"),
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}, "CrossAttnDownBlock2D"),
    ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D"]}, "different resolutions"),
    ({"block_out_channels": [32, 48]}, "multiples"),
    ({"_class_name": "UNet2DConditionModel"}, "UNet2DConditionModel"),
    ({"norm_num_groups": None}, "unsupported U-Net config"),
])
def test_unsupported_unet_configs_are_refused_by_name(override: dict[str, Any], named: str) -> None:
    with pytest.raises(ConversionError, match=named) as info:
        unet_config_from_diffusers(tiny_config(**override), source="some/config.json")
    assert "some/config.json" in str(info.value)


@pytest.mark.parametrize(("cfg", "named"), [({"beta_schedule": "scaled_linear"}, "beta_schedule"),
                                            ({"prediction_type": "v_prediction"}, "prediction_type"),
                                            ({"variance_type": "learned"}, "variance_type")])
def test_unsupported_scheduler_configs_are_refused(cfg: dict[str, Any], named: str) -> None:
    with pytest.raises(ConversionError, match=named):
        diffusion_config_from_diffusers(cfg)


def test_missing_files_and_unmatched_weights_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="not a folder"):
        import_diffusers(tmp_path / "nowhere", tmp_path / "x.safetensors")
    folder = write_folder(tmp_path / "m", random_unet2d(tiny_config()))
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ConversionError, match=r"scheduler_config\.json"):
        import_diffusers(folder, tmp_path / "x.safetensors")
    write_folder(folder, random_unet2d(tiny_config()))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["extra.weight"] = torch.zeros(3)
    del state["conv_in.bias"]
    save_file(state, str(weights))
    with pytest.raises(ConversionError, match=r"missing tensor.*conv_in\.bias.*unmatched tensor.*extra\.weight") \
            as info:
        import_diffusers(folder, tmp_path / "x.safetensors")
    assert str(weights) in str(info.value)
    assert not (tmp_path / "x.safetensors").exists()


# ---- schedule and reverse step against DDPMScheduler ------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_schedule_matches_ddpm_scheduler(schedule: str) -> None:
    cfg = {"num_train_timesteps": 1000, "beta_schedule": schedule, "beta_start": 1e-4, "beta_end": 0.02}
    ref = diffusers.DDPMScheduler(**cfg)
    ours = GaussianDiffusion.from_config(diffusion_config_from_diffusers(cfg))
    torch.testing.assert_close(ours.betas, ref.betas, atol=1e-7, rtol=1e-5)
    # We accumulate the product in float64 (official code), diffusers in float32: ~1e-5 relative apart.
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=1e-7, rtol=2e-4)


@pytest.mark.parametrize("variance_type", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("clip", [True, False])
def test_reverse_step_matches_ddpm_scheduler(variance_type: str, clip: bool) -> None:
    cfg = {"num_train_timesteps": 100, "variance_type": variance_type, "clip_sample": clip}
    ref = diffusers.DDPMScheduler(**cfg)
    ours = GaussianDiffusion.from_config(diffusion_config_from_diffusers(cfg))
    gen = torch.Generator().manual_seed(0)
    for t in (99, 60, 10, 1, 0):
        x_t = 1.5 * torch.randn(2, 3, 4, 4, generator=gen)
        eps = torch.randn(2, 3, 4, 4, generator=gen)
        # diffusers draws its noise with torch.randn from the generator: the same seed gives the same z.
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t))
        out = ref.step(eps, t, x_t, generator=torch.Generator().manual_seed(t))
        x_prev, x0_hat = ours.p_sample_from_eps(x_t, torch.full((2,), t), eps, z)
        torch.testing.assert_close(x0_hat, out.pred_original_sample, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(x_prev, out.prev_sample, atol=1e-4, rtol=1e-4)


class _NotATensor:
    """Anything but tensors in a .bin must never be unpickled."""


def test_bin_weights_with_arbitrary_objects_are_refused(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "m", random_unet2d(tiny_config()), safe=False)
    weights = folder / "unet" / "diffusion_pytorch_model.bin"
    torch.save({"conv_in.weight": _NotATensor()}, weights)
    with pytest.raises(ConversionError, match="could not read the weights") as info:
        import_diffusers(folder, tmp_path / "x.safetensors")
    assert str(weights) in str(info.value)


def test_log_variance_spellings_map_to_the_same_variances() -> None:
    assert diffusion_config_from_diffusers({"variance_type": "fixed_small_log"}).variance == "fixedsmall"
    assert diffusion_config_from_diffusers({"variance_type": "fixed_large_log"}).variance == "fixedlarge"
    cosine = diffusion_config_from_diffusers({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 4000})
    assert (cosine.beta_schedule, cosine.num_timesteps) == ("cosine", 4000)


# ---- whole reverse chains against diffusers' scheduler loops -------------------------------------------------------
_PAPER_ABAR = GaussianDiffusion.from_config(DiffusionConfig()).alphas_cumprod


def _smooth_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in network: the exact eps for N(0, I) data, sqrt(1 - abar_t) x_t, plus a small t-dependent term."""
    t = t.reshape(-1, 1, 1, 1)
    return (1 - _PAPER_ABAR[t]).sqrt() * x + 0.05 * torch.cos(t.float() / 37.0)


def _their_chain(scheduler: Any, seed: int, shape: tuple[int, ...], **step_kwargs: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, *shape), generator=gen)
    for t in scheduler.timesteps:
        x = scheduler.step(_smooth_eps(x, t.reshape(1)), t, x, generator=gen, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize(("variance_type", "clip"), [("fixed_large", True), ("fixed_small", False)])
def test_respaced_ddpm_chain_matches_ddpm_scheduler_loop(variance_type: str, clip: bool) -> None:
    from model.sampler import Chain, ImageNoise, sample_steps

    cfg = {"num_train_timesteps": 1000, "variance_type": variance_type, "clip_sample": clip}
    ref = diffusers.DDPMScheduler(**cfg)
    ref.set_timesteps(20)  # diffusers' "leading" spacing: 950, 900, ..., 0
    ours = GaussianDiffusion.from_config(diffusion_config_from_diffusers(cfg))
    shape = (3, 4, 4)
    # One image: its stream and diffusers' generator with the same seed draw x_T and every z identically.
    chain = Chain(ours, ImageNoise([5], shape), timesteps=ref.timesteps.tolist())
    x0 = list(sample_steps(_smooth_eps, chain))[-1].x_prev
    torch.testing.assert_close(x0, _their_chain(ref, 5, shape), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_chain_matches_ddim_scheduler_loop(eta: float) -> None:
    from model.sampler import Chain, ImageNoise, sample_steps

    # Without clipping: with it, diffusers keeps the unclipped eps (use_clipped_model_output=False) while we
    # re-derive eps from the clipped x0-hat, as improved-diffusion does.
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)
    ref.set_timesteps(10)
    ours = GaussianDiffusion.from_config(DiffusionConfig(clip_denoised=False))
    shape = (3, 4, 4)
    chain = Chain(ours, ImageNoise([9], shape), timesteps=ref.timesteps.tolist(), sampler="ddim", eta=eta)
    x0 = list(sample_steps(_smooth_eps, chain))[-1].x_prev
    torch.testing.assert_close(x0, _their_chain(ref, 9, shape, eta=eta), atol=2e-4, rtol=1e-4)
