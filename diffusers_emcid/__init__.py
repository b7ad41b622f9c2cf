"""diffusers-emcid: EMCID concept editing (Xiong et al., ECCV 2024) for diffusers pipelines."""

from .config import PRESETS, EMCIDConfig
from .editor import EMCIDEditor
from .edits import ConceptEdits
from .errors import BaseModelMismatchError, ConceptEditsLoadError, EMCIDFormatError, EMCIDNumericalError
from .evaluation import EvaluationPrompt, ImageClassifierJudge, clip_zero_shot_judge, evaluate_edits
from .loaders import PIPELINES_WITH_CONCEPT_EDITS, ConceptEditsLoaderMixin, add_concept_edit_methods
from .requests import DEFAULT_TEMPLATES, ConceptEdit
from .stage2 import LowRankDelta
from .version import __version__

add_concept_edit_methods(*PIPELINES_WITH_CONCEPT_EDITS)

__all__ = [
    "BaseModelMismatchError",
    "ConceptEditsLoadError",
    "DEFAULT_TEMPLATES",
    "PRESETS",
    "ConceptEdit",
    "ConceptEdits",
    "ConceptEditsLoaderMixin",
    "EMCIDFormatError",
    "EMCIDNumericalError",
    "EMCIDConfig",
    "EMCIDEditor",
    "EvaluationPrompt",
    "ImageClassifierJudge",
    "LowRankDelta",
    "__version__",
    "clip_zero_shot_judge",
    "evaluate_edits",
]
