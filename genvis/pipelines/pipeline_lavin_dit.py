"""In-context generation with LaVin-DiT: context (input, target) pairs + a query -> the query's target.

Follows the official inference (spec /work/shared/specs/lavin_dit_mvdit.md §1.6-1.7):
1. every image / clip is resized (bicubic, antialiased) to one fixed ``height x width``, scaled to [-1, 1] and encoded
   **independently** by the VAE (posterior sample by default), then normalised ``(z - shift) * scale``;
2. the condition stream is ``[in_1, tgt_1, ..., in_N, tgt_N, query]`` along the latent time axis;
3. the target starts as Gaussian noise and is integrated with diffusers' ``FlowMatchEulerDiscreteScheduler``
   (``sigma = 1 - t``, the LaVin velocity negated);
4. classifier-free guidance runs a *second forward* whose condition stream is ``[zero frame, query]`` and combines
   ``v = v_u + w (v_c - v_u)`` for every ``w != 1`` (default ``w = 1.5``; ``w < 1`` blends towards the unconditional
   answer as the official code does, ``w = 0`` is unconditional);
5. the time grid is the official 20-point one by default (``time_grid="lavin-20"``, 19 Euler steps); ``"lavin-30"``
   and ``"lavin-40"`` name the other official grids, ``num_inference_steps=N`` gives diffusers' uniform N-step grid and
   ``sigmas`` any explicit one.
Tests: tests/lavin/test_pipeline_lavin_dit.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from genvis.diffusion.in_context import decode_clips, encode_clips, vae_compression
from genvis.diffusion.rectified_flow import DEFAULT_TIME_GRID, LAVIN_DIT_TIME_GRIDS, lavin_time_grid_sigmas
from genvis.models.lavin_dit import LaVinDiTTransformer3DModel

__all__ = ["ClipLike", "GenvisPipelineMixin", "LaVinDiTPipeline", "LaVinDiTPipelineOutput"]

# An image (PIL, or a (3, H, W) tensor in [-1, 1]) or a clip (a list of PIL frames, or a (3, T, H, W) tensor).
ClipLike = PIL.Image.Image | list[PIL.Image.Image] | torch.Tensor
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


_LOADER_MODULE = '''"""Loader module written by genvis next to model_index.json; it holds no model code.

diffusers runs it to find the pipeline class: ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``
when model_index.json names it (``"_class_name": ["{stem}", "{cls}"]``), else with ``custom_pipeline="{stem}"`` added.
It only imports the installed genvis package: the pipeline class and the modules of the genvis components, so diffusers
resolves their ``[module, class]`` entries in model_index.json.
"""

try:
    import genvis
except ImportError as err:
    raise ImportError("this folder holds a genvis {cls}: loading it needs the genvis package (pip install genvis)") from err

{imports}
from {module} import {cls}

__all__ = ["{cls}"]
'''


class GenvisPipelineMixin:
    """What every genvis ``DiffusionPipeline`` writes and reads (docs/pipelines.md).

    ``save_pretrained`` writes, next to ``model_index.json``, a loader module named after the pipeline's module
    (``pipeline_lavin_dit.py`` / ``pipeline_mvdit.py``) that only imports from genvis, and records the pipeline in
    diffusers' custom-pipeline form ``"_class_name": ["pipeline_lavin_dit", "LaVinDiTPipeline"]``. Components keep
    diffusers' ``[library, class]`` entries (genvis components by their full module path). One folder then loads with

    - the genvis class: ``LaVinDiTPipeline.from_pretrained(folder)`` (runs no code from the folder);
    - diffusers: ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``, with or without
      ``import genvis`` first, from a folder or a Hub repo (``custom_pipeline="pipeline_lavin_dit"`` may be added; it
      is what older, string-layout folders need);
    - one component: ``<component class>.from_pretrained(folder, subfolder="<name>")``.

    ``_class_name_as_list = False`` writes the bare class name instead (the layout before the switch), which diffusers
    resolves only with ``custom_pipeline``; both layouts load in the genvis classes and the demo (``serve/loading.py``).
    """

    _class_name_as_list: bool = True
    _model_card_pipeline_tag: ClassVar[str | None] = (
        None  # the Hub task of the model card (genvis.pipelines.model_card)
    )
    _model_card_tags: ClassVar[tuple[str, ...]] = ()

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *args,
        push_to_hub: bool = False,
        model_card: dict | None = None,
        **kwargs,
    ) -> None:
        """diffusers' ``save_pretrained`` plus a model card, ``README.md`` (:mod:`genvis.pipelines.model_card`).

        Args:
            save_directory: the export folder.
            push_to_hub: upload the folder (card included) to ``repo_id`` (default the folder's name) with
                ``token`` / ``private`` / ``commit_message`` / ``create_pr``, like diffusers; diffusers' own push
                would replace the card with its generic one.
            model_card: card options: ``command`` (the training command), ``metrics`` (``{name: value}``),
                ``license``, ``tags``, ``description``, ``base_model``, ``datasets``.
            *args, **kwargs: diffusers' ``save_pretrained`` options (``safe_serialization``, ``variant``, ...).
        """
        from genvis.pipelines.model_card import write_model_card

        adapters = self.get_list_adapters() if hasattr(self, "transformer") else []
        if adapters:
            raise ValueError(
                f"save_pretrained: the transformer holds LoRA adapters {adapters}, which a {type(self).__name__} "
                "folder cannot record; call pipe.fuse_lora() to fold them into the weights, or unload_lora_weights()"
            )
        hub = {
            key: kwargs.pop(key)
            for key in ("repo_id", "token", "private", "commit_message", "create_pr")
            if key in kwargs
        }
        if hub and not push_to_hub:
            raise ValueError(f"save_pretrained: {sorted(hub)} only apply with push_to_hub=True")
        super().save_pretrained(save_directory, *args, **kwargs)
        write_model_card(save_directory, self, **(model_card or {}))
        if push_to_hub:
            from huggingface_hub import create_repo

            repo_id = hub.get("repo_id", Path(save_directory).name)
            repo_id = create_repo(repo_id, exist_ok=True, private=hub.get("private"), token=hub.get("token")).repo_id
            self._upload_folder(
                save_directory,
                repo_id,
                token=hub.get("token"),
                commit_message=hub.get("commit_message"),
                create_pr=hub.get("create_pr", False),
            )

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """diffusers' ``model_index.json`` plus the loader module (see the class doc)."""
        if push_to_hub:
            raise ValueError(
                f"{type(self).__name__}.save_config(push_to_hub=True) would upload model_index.json without the "
                "weights and the loader module; push with save_pretrained(folder, push_to_hub=True)"
            )
        super().save_config(save_directory)
        index_path = Path(save_directory) / self.config_name
        index = json.loads(index_path.read_text(encoding="utf-8"))
        cls = type(self)
        stem = cls.__module__.rsplit(".", 1)[-1]  # pipeline_lavin_dit / pipeline_mvdit
        if self._class_name_as_list:
            index["_class_name"] = [stem, cls.__name__]
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        modules = sorted(
            {entry[0] for entry in index.values() if isinstance(entry, list) and len(entry) == 2 and
             isinstance(entry[0], str) and entry[0].startswith("genvis.")}
        )  # fmt: skip
        imports = "\n".join(f"import {module}  # a component's module" for module in modules)
        loader = _LOADER_MODULE.format(stem=stem, cls=cls.__name__, module=cls.__module__, imports=imports)
        (Path(save_directory) / f"{stem}.py").write_text(loader, encoding="utf-8")

    # ------------------------------------------------------------------------------------------------------------
    # offload (diffusers' methods, made to work with genvis components)
    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """diffusers' model offload. A component without parameters (``PixelUnshuffleAutoencoder``) has nothing to
        offload and stays out of accelerate's hook chain (which reads the previous model's first parameter); it is
        moved to the execution device instead."""
        weightless = {
            name for name, component in self.components.items()
            if isinstance(component, torch.nn.Module) and next(component.parameters(), None) is None
        }  # fmt: skip
        cls = type(self)
        self.model_cpu_offload_seq = "->".join(n for n in cls.model_cpu_offload_seq.split("->") if n not in weightless)
        self._exclude_from_cpu_offload = [*cls._exclude_from_cpu_offload, *sorted(weightless)]
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None):
        """diffusers' sequential offload (weights stream to an accelerator layer by layer). A CPU execution device is
        refused: accelerate's hooks cannot run on one (stock diffusers and transformers models fail the same way)."""
        if device is not None and torch.device(device).type == "cpu":
            raise ValueError(
                f"enable_sequential_cpu_offload(device={str(device)!r}): sequential offload streams weights from the "
                "CPU to an accelerator and accelerate cannot execute it on the CPU; pass an accelerator device "
                "(e.g. 'cuda'), or use enable_model_cpu_offload / no offload on a CPU-only machine"
            )
        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)

    # ------------------------------------------------------------------------------------------------------------
    # step callbacks and interruption (diffusers' callback_on_step_end contract)
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents"]

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (e.g. from a step callback) to skip the remaining steps; the latents reached
        so far are decoded as usual."""
        return getattr(self, "_interrupt", False)

    @property
    def num_timesteps(self) -> int:
        """Steps of the last / running call."""
        return getattr(self, "_num_timesteps", 0)

    @property
    def guidance_scale(self) -> float | None:
        """Guidance weight of the last / running call."""
        return getattr(self, "_guidance_scale", None)

    def _check_callback(self, callback, tensor_inputs: Sequence[str] | None) -> list[str]:
        """The tensor names the callback gets; a ``PipelineCallback`` brings its own ``tensor_inputs``."""
        if callback is None:
            return []
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback.tensor_inputs
        elif not callable(callback):
            raise ValueError(
                f"callback_on_step_end must be callable(pipe, step, timestep, tensors) -> dict, got {type(callback)}"
            )
        names = list(tensor_inputs or [])
        unknown = [name for name in names if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs: {unknown} not among {type(self).__name__}'s "
                f"{self._callback_tensor_inputs}"
            )
        return names

    def _run_callback(self, callback, names: list[str], step: int, timestep, tensors: dict) -> dict:
        """Call ``callback(self, step, timestep, {name: tensor})``; the tensors it returns replace the pipeline's."""
        outputs = callback(self, step, timestep, {name: tensors[name] for name in names})
        if outputs is None:
            return tensors
        if not isinstance(outputs, dict):
            raise ValueError(f"callback_on_step_end must return a dict of tensors, got {type(outputs).__name__}")
        unknown = [name for name in outputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end returned {unknown}, not among {type(self).__name__}'s "
                f"{self._callback_tensor_inputs}"
            )
        return {**tensors, **outputs}

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' ``load_config``; a ``[module file, class]`` pipeline name becomes the bare class name, so the
        genvis class loads such a folder without running its loader module (that module is for diffusers)."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        name = config.get("_class_name") if isinstance(config, dict) else None
        if isinstance(name, (list, tuple)) and len(name) == 2:
            config["_class_name"] = name[1]
        return loaded

    # ------------------------------------------------------------------------------------------------------------
    # LoRA (diffusers' load_lora_weights contract for the transformer)
    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict,
        adapter_name: str | None = None,
        weight_name: str | None = None,
        prefix: str | None = "transformer",
        **kwargs,
    ) -> None:
        """Load a LoRA adapter into ``self.transformer``, like diffusers pipelines' ``load_lora_weights``.

        Args:
            pretrained_model_name_or_path_or_dict: a local folder (diffusers' ``pytorch_lora_weights.safetensors``,
                else peft's ``adapter_model.safetensors``; what the train scripts write to ``<output_dir>/lora``),
                a ``.safetensors`` file, or a state dict.
            adapter_name: peft adapter name; default ``default_<n>`` (diffusers' naming). As in diffusers, the adapter
                just loaded becomes the active one; :meth:`set_adapters` activates several.
            weight_name: a file in the folder to read instead of the default ones.
            prefix: key prefix of diffusers-layout weights.

        Raises:
            ValueError: an unsupported option, a source that does not exist, or weights that do not fit the
                transformer (the source and the keys are named; nothing is loaded).
        """
        from genvis.layers.lora import load_lora_weights_into

        unsupported = sorted(kwargs)
        if unsupported:
            raise ValueError(f"{type(self).__name__}.load_lora_weights: unsupported options {unsupported}")
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, (str, os.PathLike)) and not Path(source).exists():
            raise ValueError(
                f"{type(self).__name__}.load_lora_weights: {source} does not exist (a local folder or file is "
                "expected; download a Hub repo first with huggingface_hub.snapshot_download)"
            )
        if adapter_name is None:
            adapter_name = f"default_{len(self.get_list_adapters())}"
        load_lora_weights_into(self.transformer, source, adapter_name, prefix=prefix, weight_name=weight_name)

    def get_list_adapters(self) -> list[str]:
        """Names of the LoRA adapters loaded into the transformer."""
        from peft.tuners.lora import LoraLayer

        names: dict[str, None] = {}
        for module in self.transformer.modules():
            if isinstance(module, LoraLayer):
                names.update(dict.fromkeys(module.lora_A))
        return list(names)

    def set_adapters(self, adapter_names: str | list[str]) -> None:
        """Make these loaded LoRA adapters the active ones (their outputs add up; the others are skipped).

        Raises:
            ValueError: a name that is not loaded (the loaded ones are named).
        """
        from peft.tuners.lora import LoraLayer

        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        loaded = self.get_list_adapters()
        unknown = [name for name in names if name not in loaded]
        if unknown or not names:
            raise ValueError(f"set_adapters: {unknown or names} not among the loaded adapters {loaded}")
        for module in self.transformer.modules():
            if isinstance(module, LoraLayer):
                module.set_adapter(names)

    def fuse_lora(self) -> None:
        """Fold the active LoRA adapters into the transformer's weights and drop the adapter layers (inactive ones
        are discarded), so ``save_pretrained`` writes a plain transformer."""
        from genvis.layers.lora import merge_lora

        if not self.get_list_adapters():
            raise ValueError(f"fuse_lora: {type(self).__name__}'s transformer holds no LoRA adapter")
        self.transformer = merge_lora(self.transformer)
        if "peft_config" in vars(self.transformer):
            del self.transformer.peft_config

    def unload_lora_weights(self) -> None:
        """Remove every LoRA adapter from the transformer (its layers become the plain base layers again)."""
        from peft.tuners.lora import LoraLayer

        for name, module in list(self.transformer.named_modules()):
            if isinstance(module, LoraLayer):
                parent_name, _, child = name.rpartition(".")
                parent = self.transformer.get_submodule(parent_name) if parent_name else self.transformer
                setattr(parent, child, module.get_base_layer())
        if "peft_config" in vars(self.transformer):  # peft's record of the injected adapters
            del self.transformer.peft_config


@dataclass
class LaVinDiTPipelineOutput(BaseOutput):
    """Output of :class:`LaVinDiTPipeline`.

    Args:
        frames: the generated target: a list of ``T`` PIL images (``"pil"``; one for an image task), a ``(T, H, W, 3)``
            float array in [0, 1] (``"np"``), a ``(T, 3, H, W)`` tensor in [0, 1] (``"pt"``), or the normalised
            latents ``(1, C, t, h, w)`` (``"latent"``). With ``num_images_per_prompt = B > 1``: ``B`` lists of frames,
            ``(B, T, H, W, 3)``, ``(B, T, 3, H, W)`` and ``(B, C, t, h, w)``.
    """

    frames: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class LaVinDiTPipeline(GenvisPipelineMixin, DiffusionPipeline):
    """LaVin-DiT in-context generation pipeline.

    Args:
        transformer: the J-DiT.
        vae: an ST-VAE (``genvis.vae.AutoencoderKLSTVAE`` / ``AutoencoderKLCogVideoX``) or
            ``genvis.models.PixelUnshuffleAutoencoder``; its config supplies latent channels and normalisation.
        scheduler: a flow-matching scheduler (``FlowMatchEulerDiscreteScheduler``, swappable by ``from_config``).
    """

    model_cpu_offload_seq = "vae->transformer"
    _model_card_pipeline_tag = "image-to-image"
    _model_card_tags = ("lavin-dit", "in-context-generation", "video-to-video")
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents", "condition", "uncondition"]

    def __init__(
        self, transformer: LaVinDiTTransformer3DModel, vae, scheduler: FlowMatchEulerDiscreteScheduler
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)

    # ------------------------------------------------------------------------------------------------------------
    # inputs
    def check_inputs(
        self,
        context_pairs,
        query,
        guidance_scale: float,
        num_inference_steps: int | None,
        output_type: str,
        height: int | None,
        width: int | None,
        time_grid: str | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> None:
        """Raise one ``ValueError`` per bad argument, quoting the value."""
        if not isinstance(context_pairs, (list, tuple)):
            raise ValueError(f"context_pairs must be a list of (input, target) tuples, got {type(context_pairs)}")
        for i, pair in enumerate(context_pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"context_pairs[{i}] must be an (input, target) pair, got {pair!r:.80}")
            for j, item in enumerate(pair):
                self._check_clip_like(item, f"context_pairs[{i}][{j}]")
        self._check_clip_like(query, "query")
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
        if num_inference_steps is not None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if time_grid is not None and time_grid not in LAVIN_DIT_TIME_GRIDS:
            raise ValueError(f"time_grid must be one of {sorted(LAVIN_DIT_TIME_GRIDS)} or None, got {time_grid!r}")
        given = [name for name, value in (("num_inference_steps", num_inference_steps), ("time_grid", time_grid),
                                          ("sigmas", sigmas)) if value is not None]  # fmt: skip
        if len(given) > 1:
            raise ValueError(f"give at most one of num_inference_steps, time_grid and sigmas; got {', '.join(given)}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        _, spatial = vae_compression(self.vae)
        multiple = spatial * self.transformer.config.patch_size
        for name, value in (("height", height), ("width", width)):
            if value is not None and (not isinstance(value, int) or value <= 0 or value % multiple):
                raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r}")

    @staticmethod
    def _check_clip_like(item, name: str) -> None:
        if isinstance(item, PIL.Image.Image):
            return
        if isinstance(item, (list, tuple)):
            if not item or not all(isinstance(f, PIL.Image.Image) for f in item):
                raise ValueError(f"{name}: a clip given as a list must be a non-empty list of PIL images")
            return
        if isinstance(item, torch.Tensor):
            if item.ndim not in (3, 4) or item.shape[0] != 3:
                raise ValueError(
                    f"{name}: tensors must be (3, H, W) or (3, T, H, W) in [-1, 1], got {tuple(item.shape)}"
                )
            return
        raise ValueError(f"{name}: expected a PIL image, a list of PIL frames or a tensor, got {type(item).__name__}")

    @staticmethod
    def _to_clip(item: ClipLike) -> torch.Tensor:
        """Any accepted input -> ``(3, T, H, W)`` float in [-1, 1] (not resized)."""
        if isinstance(item, torch.Tensor):
            clip = item.float()
            return clip.unsqueeze(1) if clip.ndim == 3 else clip
        frames = [item] if isinstance(item, PIL.Image.Image) else list(item)
        arrays = [torch.from_numpy(np.asarray(f.convert("RGB"), dtype=np.float32)) for f in frames]  # (H, W, 3)
        return torch.stack(arrays).permute(3, 0, 1, 2) / 127.5 - 1.0  # (T, H, W, 3) -> (3, T, H, W) in [-1, 1]

    def preprocess(self, item: ClipLike, height: int, width: int) -> torch.Tensor:
        """Resize (bicubic, antialiased) to ``height x width`` -> ``(3, T, H, W)`` in [-1, 1]."""
        clip = self._to_clip(item)
        if clip.shape[-2:] != (height, width):
            frames = clip.transpose(0, 1)  # (T, 3, H, W)
            frames = F.interpolate(frames, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
            clip = frames.clamp(-1, 1).transpose(0, 1)
        temporal, _ = vae_compression(self.vae)
        if (clip.shape[1] - 1) % temporal:
            raise ValueError(f"clips must have 1 or 1 + {temporal}k frames for this VAE, got {clip.shape[1]} frames")
        return clip

    # ------------------------------------------------------------------------------------------------------------
    # latents
    def encode_clips(
        self, clips: Sequence[torch.Tensor], generator: torch.Generator | None = None, sample_posterior: bool = True
    ) -> list[torch.Tensor]:
        """Encode each ``(3, T, H, W)`` clip on its own -> normalised latents ``(C, t, h, w)``."""
        return encode_clips(self.vae, clips, generator, sample_posterior)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, C, t, h, w)`` -> pixels ``(B, 3, T, H, W)`` in [-1, 1]."""
        return decode_clips(self.vae, latents)

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        context_pairs: list[tuple[ClipLike, ClipLike]],
        query: ClipLike,
        num_inference_steps: int | None = None,
        guidance_scale: float = 1.5,
        height: int | None = None,
        width: int | None = None,
        sigmas: list[float] | None = None,
        time_grid: str | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        sample_posterior: bool = True,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> LaVinDiTPipelineOutput | tuple:
        """Generate the target of ``query`` for the task shown by ``context_pairs``.

        Args:
            context_pairs: ``[(input, target), ...]`` examples of the task, each an image (PIL or a ``(3, H, W)``
                tensor in [-1, 1]) or a clip (list of PIL frames or a ``(3, T, H, W)`` tensor). Pairs may repeat
                (the official code samples them with replacement). An empty list runs the query alone.
            query: the input to answer, same kinds as above; the target gets as many frames as the query.
            num_inference_steps: Euler steps on diffusers' uniform grid (instead of the official grid).
            guidance_scale: CFG weight ``w`` in ``v_u + w (v_c - v_u)``; ``w = 1`` is no guidance (and skips the
                unconditional forward), ``w < 1`` blends towards the unconditional answer, ``w = 0`` is unconditional.
            height: frame height after resizing (default: the query's height).
            width: frame width after resizing (default: the query's width).
            sigmas: explicit diffusers sigmas (1 = noise, the final 0 is appended by the scheduler).
            time_grid: an official grid by name: ``"lavin-20"`` (the default when none of ``num_inference_steps``,
                ``time_grid`` and ``sigmas`` is given), ``"lavin-30"`` or ``"lavin-40"``.
            generator: RNG for the VAE posterior samples and the initial noise; a list gives one generator per
                sample (``num_images_per_prompt`` of them), and sample ``i`` then equals a one-sample call with
                ``generator[i]``. One generator draws one set of posterior samples shared by all samples.
            latents: initial noise ``(num_images_per_prompt, C, t, h, w)`` instead of drawing it.
            sample_posterior: encode with a posterior sample (official) rather than its mean.
            num_images_per_prompt: answers to draw for the query (one batch through the transformer). With more
                than one, every output below gains a leading sample axis (``"pil"``: one list of frames per sample).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: return a :class:`LaVinDiTPipelineOutput` instead of a tuple.
            callback_on_step_end: ``callback(pipe, step, timestep, tensors) -> dict`` after every step (or a diffusers
                ``PipelineCallback``); ``tensors`` holds the names in ``callback_on_step_end_tensor_inputs`` and the
                returned tensors replace them. Setting ``pipe._interrupt = True`` skips the remaining steps.
            callback_on_step_end_tensor_inputs: names from ``["latents", "condition", "uncondition"]`` (default
                ``["latents"]``): the target latents, and the condition streams of both CFG branches.
        """
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        tensor_names = self._check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self._guidance_scale, self._interrupt = guidance_scale, False
        self.check_inputs(
            context_pairs, query, guidance_scale, num_inference_steps, output_type, height, width, time_grid, sigmas
        )
        query_clip = self._to_clip(query)
        height = height or query_clip.shape[-2]
        width = width or query_clip.shape[-1]
        self.check_inputs(
            context_pairs, query, guidance_scale, num_inference_steps, output_type, height, width, time_grid, sigmas
        )
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        batch = num_images_per_prompt
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(
                f"generator: a list needs one generator per sample, got {len(generator)} for "
                f"num_images_per_prompt={batch}"
            )
        device, dtype = self._execution_device, self.transformer.dtype

        # 1. encode every clip independently; condition stream = pairs then query along latent time
        clips = [self.preprocess(item, height, width) for pair in context_pairs for item in pair]
        clips.append(self.preprocess(query, height, width))
        per_sample = generator if isinstance(generator, list) else [generator]  # a draw per generator
        encoded = [self.encode_clips(clips, g, sample_posterior) for g in per_sample]
        copies = batch // len(encoded)  # one generator: its draw serves every sample
        query_latents = torch.stack([e[-1] for e in encoded]).repeat(copies, 1, 1, 1, 1)  # (B, C, t_q, h, w)
        condition = torch.stack([torch.cat(e, dim=1) for e in encoded]).repeat(copies, 1, 1, 1, 1).to(dtype)
        # unconditional branch: one all-zero latent frame, then the query
        uncondition = torch.cat([torch.zeros_like(query_latents[:, :, :1]), query_latents], dim=2).to(dtype)
        do_cfg = guidance_scale != 1.0  # the official blend for any w; w = 1 is exactly the conditional velocity

        # 2. noise for the target (as many latent frames as the query)
        shape = tuple(query_latents.shape)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=torch.float32)

        # 3. Euler integration in diffusers' sigma convention
        if num_inference_steps is not None:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        else:
            if sigmas is None:
                sigmas = lavin_time_grid_sigmas(time_grid or DEFAULT_TIME_GRID)
            self.scheduler.set_timesteps(sigmas=list(sigmas), device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, timestep in enumerate(timesteps):
                if self.interrupt:
                    continue
                sigma = float(self.scheduler.sigmas[i])
                flow_time = torch.full((batch,), 1.0 - sigma, device=device)  # LaVin time: 1 = data
                velocity = self.transformer(latents.to(dtype), condition, flow_time).sample
                if do_cfg:
                    velocity_u = self.transformer(latents.to(dtype), uncondition, flow_time).sample
                    velocity = velocity_u + guidance_scale * (velocity - velocity_u)
                # diffusers' flow velocity is noise - data: negate LaVin's data - noise
                latents = self.scheduler.step(-velocity.float(), timestep, latents).prev_sample
                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "condition": condition, "uncondition": uncondition}
                    tensors = self._run_callback(callback_on_step_end, tensor_names, i, timestep, tensors)
                    latents, condition, uncondition = tensors["latents"], tensors["condition"], tensors["uncondition"]
                progress.update()

        # 4. decode
        if output_type == "latent":
            frames = latents
        else:
            unit = (self.decode_latents(latents) + 1) / 2  # (B, 3, T, H, W) in [0, 1]
            if output_type == "pt":
                frames = unit.transpose(1, 2).cpu()  # (B, T, 3, H, W)
            else:
                frames = unit.permute(0, 2, 3, 4, 1).cpu().numpy()  # (B, T, H, W, 3)
                if output_type == "pil":
                    frames = [self.numpy_to_pil(array) for array in frames]
            frames = frames[0] if batch == 1 else frames
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return LaVinDiTPipelineOutput(frames=frames)
