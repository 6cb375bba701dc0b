"""The shared vision encoder: native-resolution ViT with packing and registers, transformers checkpoint import,
PH-Reg post-hoc registers."""

from genvis.encoders.packing import (
    NativeResolutionProcessor,
    PackedVisionInput,
    naflex_size,
    patchify_frames,
    smart_resize,
    token_coordinates,
    tokens_to_grids,
)
from genvis.encoders.vit import VISION_TRANSFORMER_PRESETS, VisionTransformerModel, VisionTransformerOutput

__all__ = [
    "VISION_TRANSFORMER_PRESETS",
    "NativeResolutionProcessor",
    "PackedVisionInput",
    "VisionTransformerModel",
    "VisionTransformerOutput",
    "naflex_size",
    "patchify_frames",
    "smart_resize",
    "token_coordinates",
    "tokens_to_grids",
]
