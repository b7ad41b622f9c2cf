"""The exceptions of diffusers-emcid. Bad arguments raise plain `ValueError`/`TypeError`."""

from __future__ import annotations


class ConceptEditsLoadError(ValueError):
    """Concept edits cannot be loaded: see `EMCIDFormatError` and `BaseModelMismatchError`."""


class EMCIDFormatError(ConceptEditsLoadError):
    """A concept-edit file or folder is malformed, incomplete, or of a newer format version."""


class BaseModelMismatchError(ConceptEditsLoadError):
    """Concept edits do not fit a pipeline: other layers or shapes, or other base weights (without `force`)."""


class EMCIDNumericalError(ArithmeticError):
    """A computation went numerically wrong (a non-finite stage-1 loss, a singular stage-2 system); the
    message names the concepts or layer concerned and a fix. Nothing non-finite is ever cached or written."""
