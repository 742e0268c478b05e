"""Hugging Face folders written as GGUF files in llama.cpp's layout (``gemmakit quantize``)."""

from .writer import GGUF_TYPES, LLAMACPP_TYPES, OWN_TYPES, quantize_folder

__all__ = ["GGUF_TYPES", "LLAMACPP_TYPES", "OWN_TYPES", "quantize_folder"]
