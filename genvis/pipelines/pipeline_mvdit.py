"""Text-to-video generation with MVDiT (OpenVid-1M), as a diffusers ``DiffusionPipeline``.

Components: a ``transformers`` tokenizer + text encoder (:mod:`genvis.text`), the
:class:`~genvis.models.mvdit.MVDiTTransformer3DModel`, a video VAE and a diffusers scheduler. The VAE is the
ST-VAE (``AutoencoderKLCogVideoX`` / ``genvis.vae.AutoencoderKLSTVAE``, 4x temporal + 8x spatial compression, clips
of ``1 + 4k`` frames), a per-frame image VAE (``AutoencoderKL``, as OpenVid's SD VAE: every frame encoded on its own)
or any clip autoencoder with the same interface (``genvis.models.PixelUnshuffleAutoencoder``: exact, for pixel-space
tiny runs). The scheduler decides the
objective: ``DDPMScheduler`` with ``variance_type="learned_range"`` receives the model's variance channels, any other
scheduler (DDIM, DPM-Solver, ``FlowMatchEulerDiscreteScheduler`` for a rectified-flow model) only the first
``in_channels``.

Classifier-free guidance guides the noise channels only and keeps the conditional variance (DiT/OpenVid). The
unconditional branch is the model's null caption (what caption dropout trained) unless a ``negative_prompt`` is given.
``export_video`` writes mp4 (PyAV libx264) or gif (PIL). Tests: tests/mvdit/test_pipeline_mvdit.py.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, AutoencoderKLCogVideoX, DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from genvis.models.mvdit import MVDiTTransformer3DModel
from genvis.pipelines.pipeline_lavin_dit import GenvisPipelineMixin
from genvis.text.encoders import encode_prompts

__all__ = [
    "IMAGE_VAE_CONFIGS",
    "MVDiTPipeline",
    "MVDiTPipelineOutput",
    "build_image_vae",
    "classifier_free_guidance",
    "decode_video_latents",
    "encode_video_latents",
    "export_video",
    "latent_num_frames",
    "vae_spatial_compression",
]

VideoVAE = AutoencoderKL | AutoencoderKLCogVideoX
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class MVDiTPipelineOutput(BaseOutput):
    """Output of :class:`MVDiTPipeline`.

    Args:
        frames: ``"pil"``: one list of PIL frames per video; ``"np"``: ``(B, T, H, W, 3)`` float in [0, 1];
            ``"pt"``: ``(B, T, 3, H, W)`` float in [0, 1]; ``"latent"``: the final latents ``(B, C, t, h, w)``.
    """

    frames: list[list[PIL.Image.Image]] | np.ndarray | torch.Tensor


# ---------------------------------------------------------------------------------------------------------------------
# Video <-> latents for both VAE kinds


# Per-frame image VAE (diffusers ``AutoencoderKL``) presets. "sd" is the layout of OpenVid's
# ``stabilityai/sd-vae-ft-ema`` (load the real weights with ``AutoencoderKL.from_pretrained``); "tiny" is the CPU size
# with the same 8x spatial compression and 4 latent channels.
IMAGE_VAE_CONFIGS: dict[str, dict] = {
    "tiny": {
        "block_out_channels": [16, 16, 32, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "latent_channels": 4,
        "sample_size": 32,
        "scaling_factor": 1.0,
    },
    "sd": {
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 2,
        "latent_channels": 4,
        "sample_size": 256,
        "scaling_factor": 0.18215,
    },
}


def build_image_vae(preset: str = "tiny", **overrides) -> AutoencoderKL:
    """A randomly initialised per-frame ``AutoencoderKL`` of ``preset`` with config ``overrides``."""
    if preset not in IMAGE_VAE_CONFIGS:
        raise ValueError(f"preset: expected one of {list(IMAGE_VAE_CONFIGS)}, got {preset!r}")
    return AutoencoderKL(**{**IMAGE_VAE_CONFIGS[preset], **overrides})


def _vae_kind(vae) -> Literal["image", "cogvideox", "video"]:
    """``image``: per-frame ``AutoencoderKL``; ``cogvideox``: the ST-VAE family; ``video``: any other autoencoder
    taking whole clips ``(B, C, T, H, W)`` (e.g. ``genvis.models.PixelUnshuffleAutoencoder``)."""
    if isinstance(vae, AutoencoderKL):
        return "image"
    if isinstance(vae, AutoencoderKLCogVideoX):
        return "cogvideox"
    if not hasattr(vae.config, "temporal_compression_ratio"):
        raise ValueError(
            f"vae: expected an AutoencoderKL, an AutoencoderKLCogVideoX or a clip autoencoder whose config has "
            f"temporal_compression_ratio, got {type(vae).__name__}"
        )
    return "video"


def vae_spatial_compression(vae: VideoVAE) -> int:
    """Pixels per latent along height/width (8 for the SD VAE and the ST-VAE)."""
    ratio = getattr(vae.config, "spatial_compression_ratio", None)
    return int(ratio) if ratio else 2 ** (len(vae.config.block_out_channels) - 1)


def latent_num_frames(vae: VideoVAE, num_frames: int) -> int:
    """Latent frames of a ``num_frames`` clip (ST-VAE: ``1 + (T - 1) / 4``; per-frame VAE: ``T``)."""
    if num_frames < 1:
        raise ValueError(f"num_frames: expected >= 1, got {num_frames}")
    kind = _vae_kind(vae)
    ratio = 1 if kind == "image" else int(vae.config.temporal_compression_ratio)
    if ratio == 1:
        return num_frames
    from genvis.vae import AutoencoderKLSTVAE

    # diffusers' stock CogVideoX decoder keeps the first latent frame apart only for odd latent counts, so an even
    # count does not decode back (2 latents -> 8 frames, not 5); genvis' AutoencoderKLSTVAE handles every count
    step = 2 * ratio if kind == "cogvideox" and not isinstance(vae, AutoencoderKLSTVAE) else ratio
    if (num_frames - 1) % step:
        raise ValueError(
            f"num_frames: {type(vae).__name__} round-trips 1 + {step}k frames (1, {1 + step}, {1 + 2 * step}, ...), "
            f"got {num_frames}"
        )
    return 1 + (num_frames - 1) // ratio


def _latent_stats(vae: VideoVAE) -> tuple[float, float]:
    shift = getattr(vae.config, "shift_factor", None)
    return (0.0 if shift is None else float(shift)), float(vae.config.scaling_factor)


def encode_video_latents(
    vae: VideoVAE,
    video: torch.Tensor,
    generator: torch.Generator | None = None,
    sample_posterior: bool = True,
    normalize: bool = True,
) -> torch.Tensor:
    """Encode clips ``(B, 3, T, H, W)`` in [-1, 1] to latents ``(B, C, t, H/f, W/f)``.

    Args:
        vae: ST-VAE or clip autoencoder (whole clip at once), or image VAE (frame by frame).
        video: the clips.
        generator: RNG of the posterior sample.
        sample_posterior: posterior sample (OpenVid, LaVin) or its mean.
        normalize: apply the VAE config's ``(z - shift_factor) * scaling_factor``.
    """
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video: expected (B, 3, T, H, W), got {tuple(video.shape)}")
    latent_num_frames(vae, video.shape[2])
    B, _, T = video.shape[:3]
    video = video.to(dtype=vae.dtype)
    kind = _vae_kind(vae)
    if kind == "cogvideox":
        from genvis.vae import posterior

        distribution = posterior(vae, video)
    elif kind == "image":
        distribution = vae.encode(video.transpose(1, 2).flatten(0, 1)).latent_dist  # frames (B*T, 3, H, W)
    else:
        distribution = vae.encode(video).latent_dist
    latents = distribution.sample(generator=generator) if sample_posterior else distribution.mode()
    if kind == "image":
        latents = latents.unflatten(0, (B, T)).transpose(1, 2)  # (B*T, C, h, w) -> (B, C, T, h, w)
    if not normalize:
        return latents
    shift, scale = _latent_stats(vae)
    return (latents - shift) * scale


def decode_video_latents(vae: VideoVAE, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents ``(B, C, t, h, w)`` -> clips ``(B, 3, T, H, W)`` in [-1, 1] (not clamped)."""
    channels = int(vae.config.latent_channels)
    if latents.ndim != 5 or latents.shape[1] != channels:
        raise ValueError(f"latents: expected (B, {channels}, t, h, w), got {tuple(latents.shape)}")
    shift, scale = _latent_stats(vae)
    latents = (latents / scale + shift).to(vae.dtype)
    kind = _vae_kind(vae)
    if kind == "cogvideox":
        from genvis.vae import decode_latents

        return decode_latents(vae, latents, denormalize=False)
    if kind == "video":
        return vae.decode(latents).sample
    B, _, t = latents.shape[:3]
    frames = vae.decode(latents.transpose(1, 2).flatten(0, 1)).sample  # (B*t, 3, H, W)
    return frames.unflatten(0, (B, t)).transpose(1, 2)


def classifier_free_guidance(
    conditional: torch.Tensor, unconditional: torch.Tensor, guidance_scale: float, channels: int
) -> torch.Tensor:
    """``uncond + w (cond - uncond)`` on the first ``channels`` (noise or velocity); the remaining channels (learned
    variance values) are taken from the conditional branch, so ``w = 1`` returns ``conditional`` on every channel."""
    guided = unconditional[:, :channels] + guidance_scale * (conditional[:, :channels] - unconditional[:, :channels])
    return torch.cat([guided, conditional[:, channels:]], dim=1)


def export_video(
    frames: list[PIL.Image.Image] | np.ndarray | torch.Tensor, path: str | os.PathLike, fps: float = 8.0
) -> Path:
    """Write one video as ``.mp4`` (H.264 via PyAV) or ``.gif`` (PIL), chosen by the suffix of ``path``.

    Args:
        frames: PIL frames, ``(T, H, W, 3)`` uint8 or float in [0, 1], or ``(T, 3, H, W)`` float in [0, 1].
        path: destination ending in ``.mp4`` or ``.gif``.
        fps: frame rate (OpenVid samples at 8).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise ValueError(f"path: expected a .mp4 or .gif file name, got {str(path)!r}")
    if fps <= 0:
        raise ValueError(f"fps: expected > 0, got {fps}")
    if isinstance(frames, list):
        array = np.stack([np.asarray(frame.convert("RGB")) for frame in frames])
    else:
        array = frames.detach().float().cpu().numpy() if torch.is_tensor(frames) else np.asarray(frames)
        if array.ndim == 4 and array.shape[1] == 3 and array.shape[-1] != 3:
            array = array.transpose(0, 2, 3, 1)  # (T, 3, H, W) -> (T, H, W, 3)
        if array.dtype != np.uint8:
            array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.ndim != 4 or array.shape[-1] != 3 or len(array) == 0:
        raise ValueError(f"frames: expected (T, H, W, 3) with T >= 1, got shape {array.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        images = [PIL.Image.fromarray(frame) for frame in array]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        return path
    from genvis.data.video import write_mp4

    # yuv420p needs even sizes: pad odd ones by repeating the last row/column
    pad_h, pad_w = array.shape[1] % 2, array.shape[2] % 2
    if pad_h or pad_w:
        array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    write_mp4(path, array, fps=fps)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline


class MVDiTPipeline(GenvisPipelineMixin, DiffusionPipeline):
    """Text-to-video with an MVDiT denoiser.

    Args:
        tokenizer: tokenizer of ``text_encoder``.
        text_encoder: a ``transformers`` encoder whose hidden width is the transformer's ``text_embed_dim``.
        transformer: the MVDiT denoiser.
        vae: ST-VAE (``AutoencoderKLCogVideoX``) or per-frame image VAE (``AutoencoderKL``).
        scheduler: a diffusers scheduler matching the training objective.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _model_card_pipeline_tag = "text-to-video"
    _model_card_tags = ("mvdit", "text-to-video")
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents", "prompt_embeds", "prompt_attention_mask"]

    def __init__(
        self,
        tokenizer,
        text_encoder,
        transformer: MVDiTTransformer3DModel,
        vae: VideoVAE,
        scheduler: SchedulerMixin,
    ) -> None:
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
        )

    @property
    def vae_scale_factor(self) -> int:
        return vae_spatial_compression(self.vae)

    @property
    def default_num_frames(self) -> int:
        # OpenVid trains 16 frames through the per-frame VAE; 17 = 1 + 4 * 4 is the ST-VAE equivalent
        return 17 if _vae_kind(self.vae) == "cogvideox" else 16

    # ----------------------------------------------------------------------------------------------------------
    # inputs

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        height: int,
        width: int,
        num_frames: int,
        num_inference_steps: int,
        guidance_scale: float,
        output_type: str,
        prompt_embeds: torch.Tensor | None,
        prompt_attention_mask: torch.Tensor | None,
        max_sequence_length: int,
    ) -> None:
        """Raise one ``ValueError`` per bad argument, quoting the value."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        if prompt is not None and not (
            isinstance(prompt, str)
            or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))
        ):
            raise ValueError(f"prompt: expected a str or a non-empty list of str, got {prompt!r}")
        if prompt_embeds is not None:
            if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != self.transformer.config.text_embed_dim:
                raise ValueError(
                    f"prompt_embeds: expected (B, L, {self.transformer.config.text_embed_dim}), "
                    f"got {tuple(prompt_embeds.shape)}"
                )
            if prompt_attention_mask is not None and prompt_attention_mask.shape != prompt_embeds.shape[:2]:
                raise ValueError(
                    f"prompt_attention_mask: expected shape {tuple(prompt_embeds.shape[:2])}, "
                    f"got {tuple(prompt_attention_mask.shape)}"
                )
            if negative_prompt is not None:
                raise ValueError("negative_prompt needs prompt (text), not prompt_embeds")
        if negative_prompt is not None:
            batch = 1 if isinstance(prompt, str) else len(prompt or [])
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            if not isinstance(negatives, list) or len(negatives) not in (1, batch):
                raise ValueError(
                    f"negative_prompt: expected a str or a list of {batch} str (one per prompt), got {negative_prompt!r}"
                )
        factor = self.vae_scale_factor * self.transformer.config.patch_size[1]
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < factor or value % factor:
                raise ValueError(f"{name}: expected a positive multiple of {factor} (VAE x patch), got {value!r}")
        try:
            frames = latent_num_frames(self.vae, num_frames) if isinstance(num_frames, int) else None
        except ValueError as err:
            raise ValueError(str(err)) from None
        if frames is None or frames % self.transformer.config.patch_size[0]:
            raise ValueError(
                f"num_frames: expected an int whose latent frame count is divisible by the temporal patch "
                f"{self.transformer.config.patch_size[0]}, got {num_frames!r}"
            )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected an int >= 1, got {num_inference_steps!r}")
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale: expected >= 0, got {guidance_scale!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")
        limit = self.transformer.config.max_text_length
        if not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= limit:
            raise ValueError(
                f"max_sequence_length: expected an int in [1, {limit}] (transformer max_text_length), "
                f"got {max_sequence_length!r}"
            )

    def encode_prompt(
        self,
        prompt: str | list[str],
        max_sequence_length: int,
        device: torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden_states (B, L, C), bool mask (B, L))`` of ``prompt``, padded to ``max_sequence_length``."""
        return encode_prompts(
            self.tokenizer,
            self.text_encoder,
            prompt,
            max_sequence_length,
            device=device or self._execution_device,
            dtype=self.transformer.dtype,
        )

    def prepare_latents(
        self,
        batch_size: int,
        num_frames: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Initial noise ``(B, C, t, h, w)`` scaled by the scheduler's ``init_noise_sigma``."""
        shape = (
            batch_size,
            self.transformer.config.in_channels,
            latent_num_frames(self.vae, num_frames),
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if latents is not None:
            if latents.shape != shape:
                raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
            return latents.to(device=device, dtype=dtype)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"generator: got a list of {len(generator)} generators for {batch_size} videos")
        # flow-matching schedulers start from unit noise and define no init_noise_sigma
        init_sigma = getattr(self.scheduler, "init_noise_sigma", 1.0)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype) * init_sigma

    def _scheduler_takes_variance(self) -> bool:
        # only schedulers with a variance_type argument split the variance channels off themselves; from_config keeps
        # foreign keys in the config, so a DDIM made from a DDPM config still shows variance_type there
        accepts = "variance_type" in inspect.signature(type(self.scheduler).__init__).parameters
        return accepts and getattr(self.scheduler.config, "variance_type", None) in ("learned", "learned_range")

    # ----------------------------------------------------------------------------------------------------------
    # generation

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 100,
        guidance_scale: float = 7.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        output_type: Literal["pil", "np", "pt", "latent"] = "pil",
        return_dict: bool = True,
        max_sequence_length: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> MVDiTPipelineOutput | tuple:
        """Generate videos from text.

        Args:
            prompt: one prompt or a list.
            negative_prompt: text of the unconditional branch (one, or one per prompt); None uses the model's null
                caption, which is what caption dropout trained.
            num_frames: frames of the output clip (ST-VAE: ``1 + 4k``); default 17 (ST-VAE) or 16 (per-frame VAE).
            height: output height in pixels, a multiple of VAE factor x patch size; default from the transformer.
            width: output width, same rule.
            num_inference_steps: denoising steps (the paper: 100 respaced DDPM steps).
            guidance_scale: classifier-free guidance weight ``w`` in ``uncond + w (cond - uncond)`` (paper: 7.0);
                ``<= 1`` runs the conditional branch only.
            num_videos_per_prompt: videos per prompt.
            generator: torch generator(s) for the initial noise and the sampler's noise.
            latents: initial noise ``(B, C, t, h, w)`` instead of drawing it.
            prompt_embeds: pre-computed text hidden states ``(B, L, text_embed_dim)`` instead of ``prompt``.
            prompt_attention_mask: ``(B, L)`` mask of ``prompt_embeds`` (None = all tokens real).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: return :class:`MVDiTPipelineOutput` instead of a tuple.
            max_sequence_length: text tokens (default the transformer's ``max_text_length``).
            callback_on_step_end: ``callback(pipe, step, timestep, tensors) -> dict`` after every step (or a diffusers
                ``PipelineCallback``); ``tensors`` holds the names in ``callback_on_step_end_tensor_inputs`` and the
                returned tensors replace them. Setting ``pipe._interrupt = True`` skips the remaining steps.
            callback_on_step_end_tensor_inputs: names from ``["latents", "prompt_embeds", "prompt_attention_mask"]``
                (default ``["latents"]``); the text tensors are those the transformer sees: conditional rows, then
                (with guidance) the unconditional rows.
        """
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        tensor_names = self._check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self._guidance_scale, self._interrupt = guidance_scale, False
        config = self.transformer.config
        height = height if height is not None else config.sample_size * self.vae_scale_factor
        width = width if width is not None else config.sample_size * self.vae_scale_factor
        num_frames = num_frames if num_frames is not None else self.default_num_frames
        max_sequence_length = max_sequence_length if max_sequence_length is not None else config.max_text_length
        self.check_inputs(
            prompt,
            negative_prompt,
            height,
            width,
            num_frames,
            num_inference_steps,
            guidance_scale,
            output_type,
            prompt_embeds,
            prompt_attention_mask,
            max_sequence_length,
        )
        if not isinstance(num_videos_per_prompt, int) or num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt: expected an int >= 1, got {num_videos_per_prompt!r}")
        device, dtype = self._execution_device, self.transformer.dtype
        do_cfg = guidance_scale > 1.0

        # 1. text: conditional and (for CFG) unconditional branch
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds, prompt_attention_mask = self.encode_prompt(prompts, max_sequence_length, device)
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        if prompt_attention_mask is None:
            prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.bool, device=device)
        prompt_attention_mask = prompt_attention_mask.to(device=device, dtype=torch.bool)
        batch = prompt_embeds.shape[0]
        drop_text = torch.zeros(batch, dtype=torch.bool, device=device)
        if do_cfg:
            if negative_prompt is not None:
                negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
                negatives = negatives * batch if len(negatives) == 1 else negatives
                negative_embeds, negative_mask = self.encode_prompt(negatives, prompt_embeds.shape[1], device)
                negative_drop = torch.zeros(batch, dtype=torch.bool, device=device)
            else:
                # the null caption replaces these rows inside the model (drop_text)
                negative_embeds, negative_mask = prompt_embeds, prompt_attention_mask
                negative_drop = torch.ones(batch, dtype=torch.bool, device=device)
            prompt_embeds = torch.cat([prompt_embeds, negative_embeds])
            prompt_attention_mask = torch.cat([prompt_attention_mask, negative_mask])
            drop_text = torch.cat([drop_text, negative_drop])
        # (num_videos_per_prompt copies of each prompt, cond rows first, then uncond rows)
        prompt_embeds = prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
        prompt_attention_mask = prompt_attention_mask.repeat_interleave(num_videos_per_prompt, dim=0)
        drop_text = drop_text.repeat_interleave(num_videos_per_prompt, dim=0)
        num_videos = batch * num_videos_per_prompt

        # 2. timesteps and initial noise
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(num_videos, num_frames, height, width, dtype, device, generator, latents)
        channels = config.in_channels
        keep_variance = self._scheduler_takes_variance()
        if keep_variance and self.transformer.out_channels != 2 * channels:
            raise ValueError(
                f"scheduler variance_type {self.scheduler.config.variance_type!r} needs a transformer with learn_sigma "
                f"({2 * channels} output channels), got {self.transformer.out_channels}"
            )

        # 3. denoising loop
        # only stochastic samplers take a generator (DDPM, DDIM with eta, ...); Euler / flow-matching ones do not
        step_kwargs = (
            {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        )
        self._num_timesteps = len(self.scheduler.timesteps)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if self.interrupt:
                continue
            model_input = torch.cat([latents, latents]) if do_cfg else latents
            if hasattr(self.scheduler, "scale_model_input"):
                model_input = self.scheduler.scale_model_input(model_input, t)
            timestep = t.expand(model_input.shape[0]).to(device)
            output = self.transformer(
                model_input,
                prompt_embeds,
                timestep,
                prompt_attention_mask,
                drop_text=drop_text,
            ).sample
            if do_cfg:
                output = classifier_free_guidance(*output.chunk(2), guidance_scale, channels)
            if not keep_variance:
                output = output[:, :channels]
            latents = self.scheduler.step(output, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                tensors = {
                    "latents": latents,
                    "prompt_embeds": prompt_embeds,
                    "prompt_attention_mask": prompt_attention_mask,
                }
                tensors = self._run_callback(callback_on_step_end, tensor_names, i, t, tensors)
                latents, prompt_embeds = tensors["latents"], tensors["prompt_embeds"]
                prompt_attention_mask = tensors["prompt_attention_mask"]

        # 4. decode
        if output_type == "latent":
            frames = latents
        else:
            video = decode_video_latents(self.vae, latents)  # (B, 3, T, H, W) in [-1, 1]
            video = ((video.float() + 1.0) / 2.0).clamp(0.0, 1.0).transpose(1, 2)  # (B, T, 3, H, W) in [0, 1]
            if output_type == "pt":
                frames = video
            else:
                array = video.permute(0, 1, 3, 4, 2).cpu().numpy()  # (B, T, H, W, 3)
                if output_type == "np":
                    frames = array
                else:
                    frames = [
                        [PIL.Image.fromarray((frame * 255).round().astype(np.uint8)) for frame in clip]
                        for clip in array
                    ]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return MVDiTPipelineOutput(frames=frames)
