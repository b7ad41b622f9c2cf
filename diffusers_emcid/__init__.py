"""diffusers-emcid: EMCID concept editing (Xiong et al., ECCV 2024) for diffusers pipelines."""

from .config import PRESETS, EMCIDConfig
from .editor import EMCIDEditor
from .edits import ConceptEdits
from .requests import DEFAULT_TEMPLATES, ConceptEdit
from .stage2 import LowRankDelta

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TEMPLATES",
    "PRESETS",
    "ConceptEdit",
    "ConceptEdits",
    "EMCIDConfig",
    "EMCIDEditor",
    "LowRankDelta",
    "__version__",
]
