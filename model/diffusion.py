"""The Gaussian diffusion: beta schedules, the forward process q, the posterior, the reverse step and the losses.

Notation (Ho et al. 2020; docs/MATHS.md): timesteps are indices ``t`` in 0..T-1 (index ``t`` is the paper's t+1);
``betas[t]``, ``alphas = 1 - betas``, ``alphas_cumprod[t] = prod_{s<=t} alphas[s]`` (alphabar),
``alphas_cumprod_prev[t] = alphas_cumprod[t-1]`` with ``alphas_cumprod_prev[0] = 1``. Images ``x0``/``x_t`` are
float tensors (B, C, H, W) in [-1, 1]; ``t`` is int64 (B,).

Every schedule array is computed in float64 and stored as a float32 tensor on the diffusion's device, named after
its formula (``sqrt_alphas_cumprod``, ``posterior_mean_coef1``...). The network is never owned here: every
method that needs it takes ``eps_fn(x_t, t) -> eps``, any callable (a U-Net, a respacing wrapper, a closed form).

The bound (Eq. 5): ``prior_bpd`` is L_T, ``vb_terms_from_eps`` one L_{t-1} (L_0: the discretised decoder),
``calc_bpd_loop`` all of them. p's mean inside the bound uses the *clipped* x0-hat by default (the diffusion's
``clip_denoised``, True for the paper's models), as the official evaluation does: hojonathanho/diffusion,
``scripts/run_cifar.py`` ``bpd_fn`` calls ``calc_bpd_loop`` without ``clip_denoised``, whose default there is True
(``diffusion_utils_2.py``); only its training loss with the true bound (``loss_type='kl'``) passes False.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.config import VARIANCE_TYPES, DiffusionConfig, VarianceType

__all__ = [
    "EpsFn",
    "GaussianDiffusion",
    "PMeanVariance",
    "VBTerms",
    "cosine_betas",
    "discretized_gaussian_log_likelihood",
    "linear_betas",
    "make_betas",
    "normal_kl",
]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The paper's schedule: beta_1 = 1e-4 rising linearly to beta_T = 0.02, float64 (T,)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021): alphabar(t) = cos(((t/T + s) / (1 + s)) * pi/2)^2, betas clipped at 0.999."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def make_betas(config: DiffusionConfig) -> torch.Tensor:
    if config.beta_schedule == "linear":
        return linear_betas(config.num_timesteps, config.beta_start, config.beta_end)
    return cosine_betas(config.num_timesteps)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
              ) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The official code's tanh approximation of Phi(x); kept for comparability of bits/dim.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
                                        ) -> torch.Tensor:
    """log p(x) of 8-bit data x in [-1, 1] under N(mean, exp(log_scale)^2) discretised into 256 bins.

    Each pixel's likelihood is the Gaussian mass over ``[x - 1/255, x + 1/255]``; the edge bins extend to
    -inf (x = -1) and +inf (x = 1). Elementwise, in nats.
    """
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))),
    )
    return log_probs


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


@dataclass
class PMeanVariance:
    """p_theta(x_{t-1} | x_t): mean, variance and log-variance (B,1,1,1 broadcast), and the eps / x0 used."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    eps: torch.Tensor
    x0_hat: torch.Tensor


@dataclass
class VBTerms:
    """The variational bound of a batch, in bits/dim, per sample (B,).

    ``total = prior + sum(terms)``; ``terms[:, t]`` is L_{t} for index t (``terms[:, 0]`` is the decoder
    L_0). ``mse[:, t]`` is the eps-prediction error at each t.
    """

    total: torch.Tensor
    prior: torch.Tensor
    terms: torch.Tensor
    mse: torch.Tensor


class GaussianDiffusion:
    """The diffusion process defined by ``betas`` (length T, index t = the paper's timestep t+1).

    ``variance`` and ``clip_denoised`` are the defaults for the reverse step; each method accepts overrides.
    """

    def __init__(
        self,
        betas: torch.Tensor,
        *,
        variance: VarianceType = "fixedlarge",
        clip_denoised: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        betas64 = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas64.dim() != 1 or len(betas64) < 1:
            raise ValueError("betas must be a non-empty 1-D tensor")
        if not bool(((betas64 > 0) & (betas64 <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        if variance not in VARIANCE_TYPES:
            raise ValueError(f"variance must be one of {VARIANCE_TYPES}, got {variance!r}")
        self.variance: VarianceType = variance
        self.clip_denoised = clip_denoised
        self.num_timesteps = len(betas64)
        self.device = torch.device(device)

        # All in float64 first (as the official code), then stored as float32 on the device.
        alphas = 1.0 - betas64
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        posterior_variance = betas64 * (1.0 - abar_prev) / (1.0 - abar)
        # beta~ at index 0 is 0; the log uses the next value so it stays finite (official code).
        posterior_log_var = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        if len(betas64) == 1:
            posterior_log_var = torch.log(betas64)
        arrays64 = {
            "betas": betas64,
            "alphas": alphas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
            "log_one_minus_alphas_cumprod": torch.log(1.0 - abar),
            "sqrt_recip_alphas_cumprod": (1.0 / abar).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / abar - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_var,
            "posterior_mean_coef1": betas64 * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
            # fixedlarge: sigma_t^2 = beta_t, with beta~_1 at index 0 for a better decoder likelihood.
            "fixedlarge_variance": torch.cat([posterior_variance[1:2], betas64[1:]]) if len(betas64) > 1
            else betas64,
            "fixedsmall_variance": posterior_variance,
        }
        arrays64["fixedlarge_log_variance"] = torch.log(arrays64["fixedlarge_variance"])
        arrays64["fixedsmall_log_variance"] = posterior_log_var
        self.arrays64 = arrays64
        for name, value in arrays64.items():
            setattr(self, name, value.to(device=self.device, dtype=torch.float32))

    # Type hints for the attributes set above (all float32 (T,) tensors on self.device).
    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    log_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    fixedlarge_variance: torch.Tensor
    fixedsmall_variance: torch.Tensor
    fixedlarge_log_variance: torch.Tensor
    fixedsmall_log_variance: torch.Tensor

    @classmethod
    def from_config(cls, config: DiffusionConfig, device: torch.device | str = "cpu") -> GaussianDiffusion:
        return cls(make_betas(config), variance=config.variance, clip_denoised=config.clip_denoised,
                   device=device)

    def to(self, device: torch.device | str) -> GaussianDiffusion:
        """The same process with its tensors on ``device``."""
        return GaussianDiffusion(self.arrays64["betas"], variance=self.variance,
                                 clip_denoised=self.clip_denoised, device=device)

    @staticmethod
    def _extract(arr: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """arr[t] reshaped to (B, 1, ..., 1) for broadcasting over an image batch of ``ndim`` dims."""
        return arr[t].reshape(-1, *([1] * (ndim - 1)))

    # ---- forward process ---------------------------------------------------------------------------------
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) (Eq. 4): mean, variance, log-variance."""
        e = self._extract
        return (e(self.sqrt_alphas_cumprod, t, x0.dim()) * x0,
                e(1.0 - self.alphas_cumprod, t, x0.dim()).expand_as(x0),
                e(self.log_one_minus_alphas_cumprod, t, x0.dim()).expand_as(x0))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x0) as ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (Eq. 4)."""
        e = self._extract
        return e(self.sqrt_alphas_cumprod, t, x0.dim()) * x0 + e(self.sqrt_one_minus_alphas_cumprod, t,
                                                                   x0.dim()) * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x0) = N(mu~_t, beta~_t I) (Eqs. 6-7): mean, variance, clipped log-variance."""
        e, n = self._extract, x_t.dim()
        mean = e(self.posterior_mean_coef1, t, n) * x0 + e(self.posterior_mean_coef2, t, n) * x_t
        return mean, e(self.posterior_variance, t, n), e(self.posterior_log_variance_clipped, t, n)

    # ---- eps <-> x0 -----------------------------------------------------------------------------------------
    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0-hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (Eq. 15)."""
        e, n = self._extract, x_t.dim()
        return e(self.sqrt_recip_alphas_cumprod, t, n) * x_t - e(self.sqrt_recipm1_alphas_cumprod, t, n) * eps

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        e, n = self._extract, x_t.dim()
        return (e(self.sqrt_recip_alphas_cumprod, t, n) * x_t - x0) / e(self.sqrt_recipm1_alphas_cumprod, t, n)

    # ---- reverse process -----------------------------------------------------------------------------------
    def variance_of(self, variance: VarianceType | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma_t^2, log sigma_t^2) arrays (T,) for ``fixedlarge`` or ``fixedsmall``."""
        v = variance or self.variance
        if v not in VARIANCE_TYPES:
            raise ValueError(f"variance must be one of {VARIANCE_TYPES}, got {v!r}")
        return getattr(self, f"{v}_variance"), getattr(self, f"{v}_log_variance")

    def p_mean_variance_from_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, *,
        variance: VarianceType | None = None, clip_denoised: bool | None = None,
    ) -> PMeanVariance:
        """p_theta(x_{t-1} | x_t) given the network's eps.

        With clipping (the official code): x0-hat = clip(Eq. 15, -1, 1), mean = mu~_t(x_t, x0-hat).
        Without: the same posterior mean of the unclipped x0-hat, which equals Eq. 11 exactly.
        """
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        x0_hat = self.predict_x0_from_eps(x_t, t, eps)
        if clip:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(x0_hat, x_t, t)
        var, logvar = self.variance_of(variance)
        n = x_t.dim()
        return PMeanVariance(mean, self._extract(var, t, n), self._extract(logvar, t, n), eps, x0_hat)

    def p_mean_variance(self, eps_fn: EpsFn, x_t: torch.Tensor, t: torch.Tensor, *,
                        variance: VarianceType | None = None, clip_denoised: bool | None = None
                        ) -> PMeanVariance:
        return self.p_mean_variance_from_eps(x_t, t, eps_fn(x_t, t), variance=variance,
                                             clip_denoised=clip_denoised)

    def p_sample_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor, *,
                          variance: VarianceType | None = None, clip_denoised: bool | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step (Algorithm 2): returns (x_{t-1}, x0-hat). No noise is added where t == 0."""
        out = self.p_mean_variance_from_eps(x_t, t, eps, variance=variance, clip_denoised=clip_denoised)
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        return out.mean + nonzero * torch.exp(0.5 * out.log_variance) * noise, out.x0_hat

    # ---- training -------------------------------------------------------------------------------------------
    def training_losses(self, eps_fn: EpsFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
                        ) -> torch.Tensor:
        """L_simple (Eq. 14) per sample (B,): mean over pixels of ``||eps - eps_theta(x_t, t)||^2``."""
        x_t = self.q_sample(x0, t, noise)
        return _mean_flat((noise - eps_fn(x_t, t)) ** 2)

    # ---- variational bound ------------------------------------------------------------------------------------
    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x0) || N(0, I)) in bits/dim, per sample (B,)."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, logvar = self.q_mean_variance(x0, t)
        kl = normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(logvar))
        return _mean_flat(kl) / math.log(2.0)

    def kl_term_bpd(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, out: PMeanVariance) -> torch.Tensor:
        """L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) per sample (B,) in bits/dim, p given as ``out``."""
        true_mean, _, true_logvar = self.q_posterior_mean_variance(x0, x_t, t)
        return _mean_flat(normal_kl(true_mean, true_logvar, out.mean, out.log_variance)) / math.log(2.0)

    @staticmethod
    def decoder_nll_bpd(x0: torch.Tensor, out: PMeanVariance) -> torch.Tensor:
        """L_0 = -log p(x0 | x_1) per sample (B,) in bits/dim under the discretised Gaussian, p given as ``out``."""
        return -_mean_flat(discretized_gaussian_log_likelihood(x0, out.mean, 0.5 * out.log_variance)) / math.log(2.0)

    def vb_terms_from_eps(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, *,
                          variance: VarianceType | None = None, clip_denoised: bool | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """One term of the bound per sample (B,) in bits/dim given the network's eps, and the x0-hat used.

        ``L_{t-1} = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t))`` for index t > 0; for index 0 the decoder NLL
        ``-log p(x0 | x_1)`` under the discretised Gaussian. ``clip_denoised`` (default: the diffusion's) clips
        x0-hat inside p's mean, as the official evaluation does (module docstring, "The bound").
        """
        out = self.p_mean_variance_from_eps(x_t, t, eps, variance=variance, clip_denoised=clip_denoised)
        kl, nll = self.kl_term_bpd(x0, x_t, t, out), self.decoder_nll_bpd(x0, out)
        return torch.where(t == 0, nll, kl), out.x0_hat

    def vb_terms_bpd(self, eps_fn: EpsFn, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
                     variance: VarianceType | None = None, clip_denoised: bool | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``vb_terms_from_eps`` with the network called here: the term (B,) and the eps used."""
        eps = eps_fn(x_t, t)
        term, _ = self.vb_terms_from_eps(x0, x_t, t, eps, variance=variance, clip_denoised=clip_denoised)
        return term, eps

    @torch.no_grad()
    def calc_bpd_loop(self, eps_fn: EpsFn, x0: torch.Tensor, *, generator: torch.Generator | None = None,
                      variance: VarianceType | None = None, clip_denoised: bool | None = None) -> VBTerms:
        """The full variational bound (Eq. 5) of a batch x0 (B,C,H,W) in [-1,1], every term, in bits/dim.

        Costs T network evaluations. ``x0`` should lie on the 8-bit grid (uint8 scaled to [-1, 1]).
        """
        b, T = x0.shape[0], self.num_timesteps
        terms = torch.zeros(b, T, device=x0.device)
        mse = torch.zeros(b, T, device=x0.device)
        for i in reversed(range(T)):
            t = torch.full((b,), i, device=x0.device, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) \
                if generator is not None else torch.randn_like(x0)
            x_t = self.q_sample(x0, t, noise)
            term, eps = self.vb_terms_bpd(eps_fn, x0, x_t, t, variance=variance, clip_denoised=clip_denoised)
            terms[:, i], mse[:, i] = term, _mean_flat((eps - noise) ** 2)
        prior = self.prior_bpd(x0)
        return VBTerms(total=prior + terms.sum(dim=1), prior=prior, terms=terms, mse=mse)

    @torch.no_grad()
    def estimate_bpd(self, eps_fn: EpsFn, x0: torch.Tensor, num_t: int, *,
                     generator: torch.Generator | None = None, variance: VarianceType | None = None,
                     clip_denoised: bool | None = None) -> torch.Tensor:
        """Unbiased Monte-Carlo estimate of the bound per sample (B,): prior + T * mean of ``num_t`` random terms.

        ``num_t`` network evaluations instead of T; the decoder term is always included exactly
        (it dominates the variance of the estimate).
        """
        b, T = x0.shape[0], self.num_timesteps
        dev = x0.device
        total = self.prior_bpd(x0)
        zero = torch.zeros(b, device=dev, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=generator, device=dev)
        total = total + self.vb_terms_bpd(eps_fn, x0, self.q_sample(x0, zero, noise), zero,
                                          variance=variance, clip_denoised=clip_denoised)[0]
        if num_t > 0 and T > 1:
            acc = torch.zeros(b, device=dev)
            for _ in range(num_t):
                t = torch.randint(1, T, (b,), generator=generator, device=dev)
                noise = torch.randn(x0.shape, generator=generator, device=dev)
                acc += self.vb_terms_bpd(eps_fn, x0, self.q_sample(x0, t, noise), t, variance=variance,
                                         clip_denoised=clip_denoised)[0]
            total = total + (T - 1) * acc / num_t
        return total
