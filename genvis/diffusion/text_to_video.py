"""Training objectives for text-to-video denoisers (MVDiT): the paper's DDPM or rectified flow, with caption dropout.

The denoiser is any module called as ``model(noisy, encoder_hidden_states, timestep, encoder_attention_mask,
drop_text=...)`` returning ``.sample`` (:class:`~genvis.models.mvdit.MVDiTTransformer3DModel`). Each objective names
the diffusers scheduler that samples it, so the pipeline and the training run cannot disagree on conventions:

- ``"ddpm"``: epsilon + learned-range variance, hybrid loss (:mod:`genvis.diffusion.ddpm`), uniform integer timesteps;
  sampled with ``DDPMScheduler`` (IDDPM respacing).
- ``"flow"``: rectified flow in diffusers' convention ``x = sigma * noise + (1 - sigma) * data``, the model predicts
  ``noise - data`` at ``timestep = 1000 * sigma``; times are logit-normal (:mod:`genvis.diffusion.rectified_flow`,
  whose LaVin time ``t = 1 - sigma``); sampled with ``FlowMatchEulerDiscreteScheduler``.

Caption dropout replaces a sample's caption by the model's null caption with probability ``caption_dropout`` (0.1 in
OpenVid), which is what classifier-free guidance needs. Tests: tests/mvdit/test_ddpm.py, tests/mvdit/test_train_mvdit.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from genvis.diffusion.ddpm import DDPMObjective, make_ddpm_scheduler
from genvis.diffusion.rectified_flow import flow_matching_loss, interpolate, sample_logit_normal

__all__ = ["TextToVideoLoss", "TextToVideoObjective"]


@dataclass
class TextToVideoLoss:
    """What :meth:`TextToVideoObjective.training_loss` returns.

    Args:
        loss: scalar batch mean.
        per_sample: ``(B,)`` losses.
        timesteps: ``(B,)`` model timesteps used (DDPM step index or ``1000 * sigma``).
        drop_text: ``(B,)`` bool, samples trained unconditionally.
        terms: named ``(B,)`` components (``mse``, ``vb`` for DDPM).
    """

    loss: torch.Tensor
    per_sample: torch.Tensor
    timesteps: torch.Tensor
    drop_text: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class TextToVideoObjective:
    """Objective selection, caption dropout and the matching sampling scheduler.

    Args:
        objective: ``"ddpm"`` (the paper's IDDPM objective) or ``"flow"`` (rectified flow).
        caption_dropout: probability of training a sample with the null caption.
        learned_variance: DDPM only: the model predicts the variance too (doubles its output channels).
        vb_weight: DDPM only: weight of the variational-bound term.
        num_train_timesteps: DDPM steps, and the flow timestep scale (``timestep = num_train_timesteps * sigma``).
        logit_mean: flow only: mean of the logit-normal time distribution.
        logit_std: flow only: std of the logit-normal time distribution.
        shift: flow only: time shift (> 1 spends more steps near noise, as SD3 at high resolution).
    """

    def __init__(
        self,
        objective: Literal["ddpm", "flow"] = "ddpm",
        caption_dropout: float = 0.1,
        learned_variance: bool = True,
        vb_weight: float = 1.0,
        num_train_timesteps: int = 1000,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
    ) -> None:
        if objective not in ("ddpm", "flow"):
            raise ValueError(f"objective: expected 'ddpm' or 'flow', got {objective!r}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout: expected a probability in [0, 1], got {caption_dropout}")
        if objective == "flow" and learned_variance:
            learned_variance = False  # a flow model has no variance to learn
        self.objective, self.caption_dropout = objective, caption_dropout
        self.learned_variance = learned_variance
        self.num_train_timesteps = num_train_timesteps
        self.logit_mean, self.logit_std, self.shift = logit_mean, logit_std, shift
        self.ddpm = (
            DDPMObjective(make_ddpm_scheduler(learned_variance, num_train_timesteps), vb_weight)
            if objective == "ddpm"
            else None
        )

    def make_scheduler(self) -> SchedulerMixin:
        """A fresh diffusers scheduler that samples this objective."""
        if self.ddpm is not None:
            return make_ddpm_scheduler(self.learned_variance, self.num_train_timesteps)
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.shift)

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise when the model's output channels do not fit the objective."""
        config = model.config
        expected = config.in_channels * (2 if self.learned_variance else 1)
        if model.out_channels != expected:
            raise ValueError(
                f"model out_channels: objective {self.objective!r} (learned_variance={self.learned_variance}) needs "
                f"{expected} output channels for {config.in_channels} latent channels, got {model.out_channels}; "
                "set learn_sigma accordingly"
            )

    def training_loss(
        self,
        model: Callable[..., object],
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> TextToVideoLoss:
        """Noise ``latents``, run the model with caption dropout and return the loss.

        Args:
            model: the denoiser.
            latents: clean (scaled) video latents ``(B, C, T, H, W)``.
            encoder_hidden_states: ``(B, L, text_dim)`` caption features.
            encoder_attention_mask: ``(B, L)`` caption mask.
            generator: source of timesteps, noise and dropout draws (CPU generator; None = global RNG).
        """
        if latents.ndim != 5:
            raise ValueError(f"latents: expected (B, C, T, H, W), got {tuple(latents.shape)}")
        batch, device = latents.shape[0], latents.device
        gen_device = generator.device if generator is not None else device
        drop_text = (torch.rand(batch, generator=generator, device=gen_device) < self.caption_dropout).to(device)
        noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=latents.dtype).to(device)

        if self.ddpm is not None:
            timesteps = self.ddpm.sample_timesteps(batch, generator, device)
            noisy = self.ddpm.add_noise(latents, noise, timesteps)
            output = model(noisy, encoder_hidden_states, timesteps, encoder_attention_mask, drop_text=drop_text)
            result = self.ddpm.loss(output.sample, latents, noisy, noise, timesteps)
            terms = {"mse": result.mse.detach(), "vb": result.vb.detach()}
            return TextToVideoLoss(result.loss, result.per_sample, timesteps, drop_text, terms)

        # rectified flow: LaVin time t (1 = data) = 1 - sigma
        flow_time = sample_logit_normal(
            batch, mean=self.logit_mean, std=self.logit_std, shift=self.shift, generator=generator, device=device
        )
        sigma = 1.0 - flow_time
        noisy = interpolate(latents, noise, flow_time)
        timesteps = sigma * self.num_train_timesteps
        output = model(noisy, encoder_hidden_states, timesteps, encoder_attention_mask, drop_text=drop_text)
        per_sample = flow_matching_loss(output.sample, noise - latents, l1_weight=0.0)
        return TextToVideoLoss(per_sample.mean(), per_sample, timesteps, drop_text, {"mse": per_sample.detach()})
