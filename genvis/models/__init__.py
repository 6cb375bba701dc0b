"""Model families: LaVin-DiT (J-DiT), MVDiT, SINC meta-model, MLLM vision towers."""

from genvis.models.autoencoder_pixel_unshuffle import PixelUnshuffleAutoencoder
from genvis.models.lavin_dit import (
    LAVIN_DIT_PRESETS,
    LaVinDiTTransformer3DModel,
    LaVinDiTTransformerOutput,
    convert_official_lavin_dit_state_dict,
)

__all__ = [
    "LAVIN_DIT_PRESETS",
    "LaVinDiTTransformer3DModel",
    "LaVinDiTTransformerOutput",
    "PixelUnshuffleAutoencoder",
    "convert_official_lavin_dit_state_dict",
]
