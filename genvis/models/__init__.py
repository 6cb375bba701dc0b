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

# Other families load on first use, so importing one model does not import (and pay for) all of them.
_LAZY = {
    "MVDIT_PRESETS": "genvis.models.mvdit",
    "MVDiTBlock": "genvis.models.mvdit",
    "MVDiTTransformer3DModel": "genvis.models.mvdit",
    "MVDiTTransformer3DModelOutput": "genvis.models.mvdit",
    "VisionLanguageModel": "genvis.models.vision_tower",
    "VisionLanguageProcessor": "genvis.models.vision_tower",
    "VisionTowerModel": "genvis.models.vision_tower",
    "tiny_text_config": "genvis.models.vision_tower",
    "SincMetaModel": "genvis.models.sinc",
    "SincPromptBuilder": "genvis.models.sinc",
    "SparseFormerModel": "genvis.models.sparseformer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ += list(_LAZY)
