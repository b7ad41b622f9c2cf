import pytest
import torch

from diffusers_emcid import ConceptEdits

from .conftest import statistics_captions

EVERY_FAMILY = True


def assert_same_deltas(a: ConceptEdits, b: ConceptEdits):
    assert a.concepts == b.concepts and a.deltas.keys() == b.deltas.keys()
    for component, deltas in a.deltas.items():
        for layer, delta in deltas.items():
            torch.testing.assert_close(delta.dense(), b.deltas[component][layer].dense(), rtol=1e-5, atol=1e-6)


def test_merge_equals_a_joint_edit(editor, pipe):
    dogs = editor.edit([("dog", "cat")])
    apples = editor.edit([("apple", "banana"), ("car", "tree")])
    joint = editor.edit([("dog", "cat"), ("apple", "banana"), ("car", "tree")])  # stage 1 comes from the cache
    assert_same_deltas(editor.merge(dogs, apples), joint)


def test_without_equals_an_edit_of_the_rest(editor, pipe, tmp_path):
    everything = editor.edit([("dog", "cat"), ("apple", "banana"), ("car", "tree")])
    reloaded = ConceptEdits.from_pretrained(everything.save_pretrained(tmp_path / "all"))
    assert_same_deltas(editor.without(reloaded, ["APPLE"]), editor.edit([("dog", "cat"), ("car", "tree")]))
    with pytest.raises(ValueError, match="No concept with source"):
        editor.without(everything, ["cow"])
    with pytest.raises(ValueError, match="leaves no concept"):
        editor.without(everything, ["dog", "apple", "car"])


def test_merging_different_layers_is_refused(editor, pipe, family):
    dogs = editor.edit([("dog", "cat")])
    editor.config.layers = "2:-1"  # differs from every family's default
    other = type(editor)(pipe, editor.config, cache_dir=editor.cache.root, progress=False)
    other.compute_statistics(statistics_captions(family))
    apples = other.edit([("apple", "banana")])
    with pytest.raises(ValueError, match="different layers"):
        editor.merge(dogs, apples)


def test_an_editor_with_other_stage_2_settings_refuses_to_re_solve(editor):
    dogs, apples = editor.edit([("dog", "cat")]), editor.edit([("apple", "banana")])
    editor.config.edit_weight = 0.3
    with pytest.raises(ValueError, match=r"other stage-2 settings.*EMCIDEditor\(pipe, edits.config\)"):
        editor.merge(dogs, apples)
