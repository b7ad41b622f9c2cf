"""`emcid demo` end to end on the shipped shapes model: the edit must be seen in the images."""

import pytest

from diffusers_emcid import EMCIDConfig, EMCIDEditor
from diffusers_emcid.demo import DEMO_PRESET, EDIT, PROMPTS, run_demo
from diffusers_emcid.evaluation import ImageClassifierJudge, evaluate_edits
from diffusers_emcid.shapes import (
    EDITABLE_LAYERS,
    SAMPLING,
    load_shapes_pipeline,
    shapes_judge_path,
    statistics_captions,
)

NUM_IMAGES = 12
"""Images per prompt (the demo uses 50): enough that 0.1 and 0.8 are 1 and 10 squares apart."""


@pytest.mark.slow
def test_demo_turns_circles_into_squares_and_leaves_other_shapes(tmp_path):
    result = run_demo(tmp_path / "demo", num_images=NUM_IMAGES, cache_dir=tmp_path / "cache", progress=False)
    headline = next(row for row in result.rows if row["prompt"] == "a red circle")
    assert headline["destination_before"] < 0.1 and headline["destination_after"] >= 0.8
    assert result.summary["generality"]["destination_after"] >= 0.7
    controls = result.summary["specificity"]
    assert controls["source_before"] - controls["source_after"] <= 0.05
    assert controls["source_before"] >= 0.85, "the model no longer draws the control shapes"
    assert {"metrics.json", "metrics.md", "before_after.png"} <= {p.name for p in (tmp_path / "demo").iterdir()}


@pytest.mark.slow
def test_an_edit_of_the_last_layer_alone_changes_nothing(tmp_path):
    """Negative control: past the layers without attention output, a subject-token edit cannot reach the
    positions the UNet reads."""
    assert tuple(EMCIDConfig.from_preset(DEMO_PRESET).layers) == EDITABLE_LAYERS
    pipe = load_shapes_pipeline()
    config = EMCIDConfig.from_preset(DEMO_PRESET, layers=[-1])
    editor = EMCIDEditor(pipe, config, cache_dir=tmp_path, progress=False)
    editor.compute_statistics(statistics_captions())
    edits = editor.edit([EDIT])
    judge = ImageClassifierJudge.from_pretrained(shapes_judge_path(), local_files_only=True)
    result = evaluate_edits(pipe, edits, judge, [PROMPTS[0]], num_images=NUM_IMAGES, progress=False, **SAMPLING)
    assert result.rows[0]["destination_after"] <= 0.2
