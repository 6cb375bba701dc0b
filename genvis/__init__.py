"""genvis: generative multimodal vision foundation models on one shared transformer core."""

__version__ = "0.1.0"
