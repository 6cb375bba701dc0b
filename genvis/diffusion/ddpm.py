"""DDPM with a learned-range variance and the IDDPM "hybrid" loss (the objective of MVDiT / OpenVid-1M, PixArt, DiT).

Formulation (spec /work/shared/specs/lavin_dit_mvdit.md §3.3; Nichol & Dhariwal, "Improved DDPM", arXiv 2102.09672):
- 1000 steps, linear betas 1e-4 -> 0.02, ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, uniform integer t;
- the model outputs ``2C`` channels: ``eps`` and ``v`` in [-1, 1] interpolating the log variance between the posterior
  variance (clipped at t = 0) and ``beta_t`` (IDDPM eq. 15);
- loss per sample = ``MSE(eps) + L_vb``, where ``L_vb`` is the KL between the true posterior ``q(x_{t-1} | x_t, x_0)``
  and the model's Gaussian (eq. 10-13), in bits, with the model mean computed from a *detached* eps so the VLB only
  trains the variance (the "hybrid" loss, lambda = 1 as in DiT/PixArt/OpenVid); at t = 0 the term is the discretised
  Gaussian decoder NLL (DDPM eq. 13).

Betas, the timestep grid and sampling come from diffusers' :class:`~diffusers.DDPMScheduler`
(``variance_type="learned_range"`` splits the model output and draws with the learned variance, with respaced steps
``timestep_spacing="linspace"`` = IDDPM's ``space_timesteps``). The tables used by the loss are derived from the
scheduler's betas in float64 once at construction. Tests: tests/mvdit/test_ddpm.py (KL against a Monte-Carlo estimate,
the variance interpolation against the scheduler's sampling variance, vb gradient only reaching the variance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

__all__ = [
    "DDPMHybridLoss",
    "DDPMObjective",
    "discretized_gaussian_log_likelihood",
    "make_ddpm_scheduler",
    "normal_kl",
]


def make_ddpm_scheduler(learned_variance: bool = True, num_train_timesteps: int = 1000) -> DDPMScheduler:
    """The paper's scheduler: linear betas 1e-4..0.02, epsilon prediction, IDDPM respacing for sampling.

    Args:
        learned_variance: ``"learned_range"`` variance (model outputs 2C channels) or ``"fixed_small"``.
        num_train_timesteps: diffusion steps (1000 in the paper).
    """
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        variance_type="learned_range" if learned_variance else "fixed_small",
        prediction_type="epsilon",
        clip_sample=False,
        timestep_spacing="linspace",
    )


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # tanh approximation of the normal CDF used by DDPM/IDDPM for the decoder likelihood
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, bin_width: float = 2.0 / 255.0
) -> torch.Tensor:
    """Elementwise log-likelihood (nats) of ``x`` in [-1, 1] under a Gaussian discretised into bins of ``bin_width``,
    with open-ended outer bins at -1 and 1 (DDPM eq. 13)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + bin_width / 2))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - bin_width / 2))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # the edge bins take all the mass beyond -1 + half a bin / 1 - half a bin
    edge = 1.0 - bin_width
    return torch.where(x < -edge, log_cdf_plus, torch.where(x > edge, log_one_minus_cdf_min, log_cdf_delta))


@dataclass
class DDPMHybridLoss:
    """What :meth:`DDPMObjective.loss` returns.

    Args:
        loss: scalar batch mean of ``per_sample``.
        per_sample: ``(B,)`` = ``mse + vb``.
        mse: ``(B,)`` epsilon MSE.
        vb: ``(B,)`` variational bound term in bits per dimension (zeros without a learned variance).
    """

    loss: torch.Tensor
    per_sample: torch.Tensor
    mse: torch.Tensor
    vb: torch.Tensor


class DDPMObjective:
    """Noising, timestep sampling and the hybrid loss of an epsilon-prediction DDPM.

    Args:
        scheduler: a :class:`~diffusers.DDPMScheduler` (its betas define the process; its ``variance_type`` says
            whether the model predicts the variance: ``"learned_range"`` or a fixed type).
        vb_weight: weight of the VLB term (1 = the IDDPM/DiT hybrid loss).
    """

    def __init__(self, scheduler: DDPMScheduler | None = None, vb_weight: float = 1.0) -> None:
        scheduler = scheduler if scheduler is not None else make_ddpm_scheduler()
        variance_type = scheduler.config.variance_type
        if variance_type not in ("learned_range", "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"):
            raise ValueError(
                f"scheduler.variance_type: expected 'learned_range' or a fixed type, got {variance_type!r}"
            )
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError(
                f"scheduler.prediction_type: expected 'epsilon', got {scheduler.config.prediction_type!r}"
            )
        if vb_weight < 0:
            raise ValueError(f"vb_weight: expected >= 0, got {vb_weight}")
        self.scheduler = scheduler
        self.learned_variance = variance_type == "learned_range"
        self.vb_weight = vb_weight
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

        # float64 tables (IDDPM computes them in float64; the float32 product of 1000 alphas drifts), stored as fp32
        betas = scheduler.betas.double()
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # the posterior variance is 0 at t = 0: clip its log with the t = 1 value
        posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self._tables = {
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
            "posterior_log_variance_clipped": posterior_log_variance,
            "log_betas": torch.log(betas),
        }
        self._tables = {name: table.float() for name, table in self._tables.items()}

    def _gather(self, name: str, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table values at ``timesteps`` shaped ``(B, 1, 1, ...)`` to broadcast against ``like``."""
        values = self._tables[name].to(like.device)[timesteps.long()]
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Uniform integer timesteps in ``[0, num_train_timesteps)``, shape ``(batch_size,)``."""
        gen_device = generator.device if generator is not None else device
        steps = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=gen_device)
        return steps.to(device)

    def add_noise(self, data: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``."""
        return (
            self._gather("sqrt_alphas_cumprod", timesteps, data) * data
            + self._gather("sqrt_one_minus_alphas_cumprod", timesteps, data) * noise
        ).to(data.dtype)

    def model_log_variance(self, variance_values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Learned-range log variance: ``frac * log(beta_t) + (1 - frac) * log(posterior variance)``, ``frac=(v+1)/2``."""
        min_log = self._gather("posterior_log_variance_clipped", timesteps, variance_values)
        max_log = self._gather("log_betas", timesteps, variance_values)
        frac = (variance_values + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log

    def loss(
        self,
        model_output: torch.Tensor,
        data: torch.Tensor,
        noisy: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> DDPMHybridLoss:
        """Hybrid loss of one batch (computed in fp32).

        Args:
            model_output: ``(B, 2C, ...)`` (eps, variance values) with a learned variance, else ``(B, C, ...)``.
            data: clean ``x_0`` ``(B, C, ...)``.
            noisy: ``x_t`` from :meth:`add_noise`.
            noise: the ``eps`` used to make ``noisy``.
            timesteps: ``(B,)`` integer steps.
        """
        channels = data.shape[1]
        expected = channels * (2 if self.learned_variance else 1)
        if model_output.shape[1] != expected or model_output.shape[2:] != data.shape[2:]:
            raise ValueError(
                f"model_output: expected shape {(data.shape[0], expected, *data.shape[2:])} "
                f"(learned variance: {self.learned_variance}), got {tuple(model_output.shape)}"
            )
        model_output, data, noisy, noise = (v.float() for v in (model_output, data, noisy, noise))
        dims = tuple(range(1, data.ndim))
        eps = model_output[:, :channels]
        mse = (eps - noise).square().mean(dims)
        if not self.learned_variance:
            vb = torch.zeros_like(mse)
        else:
            log_variance = self.model_log_variance(model_output[:, channels:], timesteps)
            coef1 = self._gather("posterior_mean_coef1", timesteps, data)
            coef2 = self._gather("posterior_mean_coef2", timesteps, data)
            # the mean uses a detached eps: the VLB term trains only the variance (hybrid loss)
            pred_x0 = (
                self._gather("sqrt_recip_alphas_cumprod", timesteps, data) * noisy
                - self._gather("sqrt_recipm1_alphas_cumprod", timesteps, data) * eps.detach()
            )
            model_mean = coef1 * pred_x0 + coef2 * noisy
            true_mean = coef1 * data + coef2 * noisy
            true_log_variance = self._gather("posterior_log_variance_clipped", timesteps, data)
            kl = normal_kl(true_mean, true_log_variance, model_mean, log_variance).mean(dims) / math.log(2.0)
            nll = -discretized_gaussian_log_likelihood(data, model_mean, 0.5 * log_variance).mean(dims) / math.log(2.0)
            vb = torch.where(timesteps.to(kl.device) == 0, nll, kl)
        per_sample = mse + self.vb_weight * vb
        return DDPMHybridLoss(per_sample.mean(), per_sample, mse, vb)
