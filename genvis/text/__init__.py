"""Text encoders for text-to-video models: built-in offline defaults and any ``transformers`` encoder."""

from genvis.text.encoders import (
    BUILTIN_TEXT_ENCODERS,
    DEFAULT_TEXT_ENCODER,
    TextEncoderNotFoundError,
    build_tiny_t5,
    encode_prompts,
    load_text_encoder,
    text_embed_dim,
    tiny_t5_config,
)

__all__ = [
    "BUILTIN_TEXT_ENCODERS",
    "DEFAULT_TEXT_ENCODER",
    "TextEncoderNotFoundError",
    "build_tiny_t5",
    "encode_prompts",
    "load_text_encoder",
    "text_embed_dim",
    "tiny_t5_config",
]
