"""gemmakit: run Google's Gemma models on your own hardware.

    >>> import gemmakit
    >>> llm = gemmakit.load()                      # bundled Gemma 3 270M (base model)
    >>> llm.generate("The capital of France is", max_tokens=8, temperature=0).text
"""

from .errors import (
    ChatTemplateError,
    ContextLengthError,
    CorruptFileError,
    GemmakitError,
    InvalidParameterError,
    ModelFileError,
    ModelNotFoundError,
    NotGGUFError,
    TruncatedFileError,
    UnsupportedModelError,
    WeightError,
)
from .generate import Completion, StreamEvent, Usage
from .llm import LLM, default_model_path, load
from .sampling import SamplingParams

__all__ = [
    "load",
    "LLM",
    "Completion",
    "StreamEvent",
    "Usage",
    "SamplingParams",
    "default_model_path",
    "GemmakitError",
    "ModelFileError",
    "ModelNotFoundError",
    "NotGGUFError",
    "TruncatedFileError",
    "CorruptFileError",
    "UnsupportedModelError",
    "WeightError",
    "ChatTemplateError",
    "InvalidParameterError",
    "ContextLengthError",
]
__version__ = "0.1.0"
