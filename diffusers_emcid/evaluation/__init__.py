"""Measuring edits: judges (image classifiers) and the ICEB-style before/after metrics of the paper."""

from ..images import draw_images, draw_prompt_images
from .drift import conditioning_change, pipeline_conditioning
from .judges import ImageClassifierJudge, Judge, clip_zero_shot_judge, concept_labels, concept_probability
from .metrics import GROUPS, EditEvaluation, EvaluationPrompt, evaluate_edits, load_evaluation_prompts, summarize

__all__ = [
    "GROUPS",
    "EditEvaluation",
    "EvaluationPrompt",
    "ImageClassifierJudge",
    "Judge",
    "clip_zero_shot_judge",
    "concept_labels",
    "concept_probability",
    "conditioning_change",
    "draw_images",
    "draw_prompt_images",
    "evaluate_edits",
    "load_evaluation_prompts",
    "pipeline_conditioning",
    "summarize",
]
