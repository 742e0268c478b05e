"""Every error gemmakit raises on purpose derives from :class:`GemmakitError`.

Callers (the CLI, the server, user code) can catch the base class and show its message: each message
names the file, tensor or parameter at fault and what is wrong with it.
"""

from __future__ import annotations


class GemmakitError(Exception):
    """Base class of all gemmakit errors."""


class ModelFileError(GemmakitError):
    """A model file cannot be used: missing, not a model file, truncated or corrupt."""


class ModelNotFoundError(ModelFileError, FileNotFoundError):
    """The model path does not exist or is not a file."""


class NotGGUFError(ModelFileError):
    """The file does not start with the GGUF magic."""


class TruncatedFileError(ModelFileError):
    """The file ends before the data its header describes."""


class CorruptFileError(ModelFileError):
    """The file's header holds values that cannot be true (sizes, counts, types, offsets)."""


class UnsupportedModelError(GemmakitError):
    """The file is well formed but describes something gemmakit does not run (architecture, tensor type)."""


class WeightError(GemmakitError):
    """A tensor is missing, unexpected or has the wrong shape for the model's configuration."""


class ChatTemplateError(GemmakitError, ValueError):
    """The messages cannot be rendered with the model's chat format (roles out of order, bad content)."""


class InvalidParameterError(GemmakitError, ValueError):
    """A generation or loading parameter is out of range or of the wrong type."""


class ContextLengthError(GemmakitError, ValueError):
    """A prompt (plus the tokens asked for) does not fit in the model's context."""


class ModelTooLargeError(GemmakitError):
    """Loading the model would exceed the memory budget; raised before anything large is allocated."""


class InvalidGrammarError(InvalidParameterError):
    """A JSON schema, regex, choice list or grammar given to constrain the output cannot be used; the message
    names the problem."""
