"""ST-VAE training losses and metrics: reconstruction, KL, a PatchGAN discriminator with hinge loss, PSNR.

LaVin-DiT did not release its ST-VAE training code; the paper lists pixel reconstruction + LPIPS + GAN + KL
(specs/lavin_dit_mvdit.md §2.2). This module follows the taming-transformers / LDM recipe for those terms, minus LPIPS
(its backbone weights need a download). Used by ``train/st_vae.py``; checked by ``tests/vae/test_st_vae.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn


def kl_loss(posterior: DiagonalGaussianDistribution) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) averaged over every latent element (diffusers' ``kl()`` skips W on 5-D latents)."""
    return 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()


def reconstruction_loss(
    reconstruction: torch.Tensor, target: torch.Tensor, l1_weight: float = 1.0, mse_weight: float = 1.0
) -> torch.Tensor:
    """``l1_weight * |x - x'| + mse_weight * (x - x')^2``, each averaged over every element."""
    if reconstruction.shape != target.shape:
        raise ValueError(f"reconstruction: expected shape {tuple(target.shape)}, got {tuple(reconstruction.shape)}")
    difference = reconstruction.float() - target.float()
    return l1_weight * difference.abs().mean() + mse_weight * difference.pow(2).mean()


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR in dB of ``[-1, 1]`` tensors (peak 1 on the ``[0, 1]`` scale); shape ``(B,)``."""
    if reconstruction.shape != target.shape:
        raise ValueError(f"reconstruction: expected shape {tuple(target.shape)}, got {tuple(reconstruction.shape)}")
    # [-1, 1] -> [0, 1] halves the error, so the MSE is divided by 4.
    error = (reconstruction.float().clamp(-1, 1) - target.float()).pow(2).flatten(1).mean(dim=1) / 4.0
    return 10.0 * torch.log10(1.0 / error.clamp_min(1e-10))


def frames_as_images(clips: torch.Tensor) -> torch.Tensor:
    """``(B, C, T, H, W)`` clips -> ``(B * T, C, H, W)`` frames (the discriminator judges frames)."""
    return clips.permute(0, 2, 1, 3, 4).flatten(0, 1)


class PatchDiscriminator(ModelMixin, ConfigMixin):
    """PatchGAN discriminator (pix2pix / taming ``NLayerDiscriminator``) with GroupNorm instead of BatchNorm.

    GroupNorm keeps it independent of batch composition (image and video batches alternate) and of DDP.

    Args:
        in_channels: image channels.
        base_channels: width of the first conv; doubles per layer up to 8x.
        num_layers: stride-2 convs; the receptive field is 70 px for 3 layers.
        norm_num_groups: GroupNorm groups.
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, norm_num_groups: int = 8):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = base_channels
        for index in range(1, num_layers + 1):
            out_channels = base_channels * min(2**index, 8)
            stride = 2 if index < num_layers else 1  # the last feature layer keeps resolution (pix2pix)
            layers += [
                nn.Conv2d(channels, out_channels, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(norm_num_groups, out_channels),
                nn.LeakyReLU(0.2),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))  # one logit per patch
        self.layers = nn.Sequential(*layers)
        # DCGAN init: N(0, 0.02) convs, N(1, 0.02) norm scales.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    @property
    def min_input_size(self) -> int:
        """Smallest side accepted: ``num_layers`` halvings, then two stride-1 4x4 convs that each remove 1 px."""
        return 3 * 2 ** int(self.config.num_layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` images -> ``(N, 1, h, w)`` patch logits."""
        if min(images.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"images: expected H and W >= {self.min_input_size} for num_layers={self.config.num_layers}, "
                f"got {tuple(images.shape[-2:])}; use fewer discriminator layers"
            )
        return self.layers(images)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: ``relu(1 - D(x)) + relu(1 + D(x'))``, halved."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: ``-D(x')``."""
    return -logits_fake.mean()


def adaptive_gan_weight(
    reconstruction_term: torch.Tensor,
    adversarial_term: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """Taming's balance: ``|grad rec| / (|grad adv| + 1e-4)`` at the decoder's last layer, clamped, detached."""
    rec_grad = torch.autograd.grad(reconstruction_term, last_layer_weight, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adversarial_term, last_layer_weight, retain_graph=True)[0]
    return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
