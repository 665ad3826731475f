"""Exceptions of the SteadyDancer library.

Every error that bad input can cause is one of these, with a message that says what was
wrong and what to do about it. Callers (the ComfyUI nodes, the CLI tools) show the message
as it is; they never need the traceback.
"""

from __future__ import annotations


class SteadyDancerError(Exception):
    """Base class: a problem the user can act on, explained in the message."""


class GGUFError(SteadyDancerError, ValueError):
    """A GGUF file that cannot be read: not GGUF, truncated, inconsistent or unsupported."""


class UnsupportedQuantError(GGUFError):
    """A quantisation type this package cannot (de)quantise."""


class ModelFileError(SteadyDancerError, ValueError):
    """A weights file that is readable but is not a usable SteadyDancer model."""


class AttentionBackendError(SteadyDancerError, RuntimeError):
    """An attention backend that was asked for explicitly but cannot run here."""


class MissingDependencyError(SteadyDancerError, ImportError):
    """An optional package is needed for what was asked; the message names it."""


class ConditioningError(SteadyDancerError, ValueError):
    """Inputs of the conditioning that do not fit together (frame count, sizes, batch)."""


class MemoryOptionError(SteadyDancerError, ValueError):
    """A memory option (full / auto / resident block count) that cannot be applied."""
