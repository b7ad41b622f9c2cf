import dataclasses
import json

import pytest
import torch

from diffusers_emcid import EMCIDEditor
from diffusers_emcid.key_statistics import load_captions, sample_captions

from .conftest import CAPTIONS


def direct_second_moment(pipe, layout, layer, captions, include_padding_to=None):
    """Mean of k k^T over every token of each caption, one caption at a time (no padding)."""
    total, count = 0, 0
    for caption in captions:
        kwargs = dict(padding="max_length", max_length=include_padding_to) if include_padding_to else {}
        ids = pipe.tokenizer(caption, return_tensors="pt", **kwargs).input_ids
        store = {}
        handle = layout.fc2(layer).register_forward_hook(lambda m, args, out: store.update(k=args[0][0].double()))
        try:
            with torch.no_grad():
                pipe.text_encoder(ids)
        finally:
            handle.remove()
        total = total + store["k"].T @ store["k"]
        count += store["k"].shape[0]
    return total / count


def test_paper_positions_equal_a_direct_computation_without_padding(pipe, fast_config, tmp_path):
    editor = EMCIDEditor(pipe, fast_config, cache_dir=tmp_path, progress=False)
    editor.config.statistics_positions = "paper"
    editor.config.statistics_batch_size = 5  # batches mix caption lengths, so padding is present
    covariances = editor.compute_statistics(CAPTIONS)["text_encoder"]
    assert sorted(covariances) == editor.layers
    for layer in (0, editor.layers[-1]):
        expected = direct_second_moment(pipe, editor.layout, layer, CAPTIONS)
        assert covariances[layer].dtype == torch.float32
        assert float((covariances[layer].double() - expected).norm() / expected.norm()) < 1e-6
        with_padding = direct_second_moment(pipe, editor.layout, layer, CAPTIONS, include_padding_to=20)
        assert not torch.allclose(covariances[layer].double(), with_padding, rtol=1e-3)


def direct_pipeline_second_moment(pipe, layout, layer, captions, padding_weight, empty_prompt=True):
    """Mean k k^T over the real tokens plus `padding_weight` times the mean over the padding positions, of the captions
    and the empty prompt, each encoded alone as the pipeline encodes a prompt, in float64."""
    real, padding = [], []
    for caption in [""] * empty_prompt + list(captions):
        tokens = pipe.tokenizer(
            caption, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
        )
        store = {}
        handle = layout.fc2(layer).register_forward_hook(lambda m, args, out: store.update(k=args[0][0].double()))
        try:
            with torch.no_grad():
                pipe.text_encoder(tokens.input_ids)
        finally:
            handle.remove()
        mask = tokens.attention_mask[0].bool()
        real.append(store["k"][mask])
        padding.append(store["k"][~mask])
    real, padding = torch.cat(real), torch.cat(padding)
    return real.T @ real / len(real) + padding_weight * padding.T @ padding / len(padding)


@pytest.mark.parametrize("padding_weight", [1.0, 0.25])
def test_pipeline_positions_cover_the_padding_and_the_empty_prompt(pipe, fast_config, tmp_path, padding_weight):
    editor = EMCIDEditor(pipe, fast_config, cache_dir=tmp_path, progress=False)
    assert editor.config.statistics_positions == "pipeline", "the default"
    editor.config.statistics_padding_weight = padding_weight
    editor.config.statistics_batch_size = 5
    covariances = editor.compute_statistics(CAPTIONS)["text_encoder"]
    for layer in (0, editor.layers[-1]):
        expected = direct_pipeline_second_moment(pipe, editor.layout, layer, CAPTIONS, padding_weight)
        assert float((covariances[layer].double() - expected).norm() / expected.norm()) < 1e-6
        without_empty = direct_pipeline_second_moment(
            pipe, editor.layout, layer, CAPTIONS, padding_weight, empty_prompt=False
        )
        assert float((covariances[layer].double() - without_empty).norm() / expected.norm()) > 1e-3


def test_the_positions_are_part_of_the_statistics_cache_key(pipe, fast_config, tmp_path):
    editor = EMCIDEditor(
        pipe, dataclasses.replace(fast_config, statistics_positions="paper"), cache_dir=tmp_path, progress=False
    )
    paper = editor.compute_statistics(CAPTIONS)["text_encoder"]
    calls, handle = count_text_encoder_calls(pipe)
    try:
        fresh = EMCIDEditor(pipe, fast_config, cache_dir=tmp_path, progress=False)
        with pytest.raises(ValueError, match="No key statistics"):  # the paper statistics do not serve "pipeline"
            fresh.edit([("dog", "cat")])
        pipeline = fresh.compute_statistics(CAPTIONS)["text_encoder"]
        assert calls, "the paper statistics were reused for pipeline positions"
        calls.clear()
        fresh.config.statistics_padding_weight = 2.0
        fresh.compute_statistics(CAPTIONS)
        assert calls, "statistics of another padding weight were reused"
    finally:
        handle.remove()
    assert not torch.allclose(paper[0], pipeline[0])


def count_text_encoder_calls(pipe):
    calls = []
    handle = pipe.text_encoder.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls, handle


def test_statistics_cache_is_reused_and_invalidated_by_weight_changes(pipe, fast_config, tmp_path):
    editor = EMCIDEditor(pipe, fast_config, cache_dir=tmp_path, progress=False)
    first = editor.compute_statistics(CAPTIONS)["text_encoder"]
    calls, handle = count_text_encoder_calls(pipe)
    try:
        again = EMCIDEditor(pipe, fast_config, cache_dir=tmp_path, progress=False).compute_statistics(CAPTIONS)[
            "text_encoder"
        ]
        assert not calls, "cached statistics were recomputed"
        assert all(torch.equal(first[layer], again[layer]) for layer in first)
        EMCIDEditor(pipe, fast_config, cache_dir=tmp_path, progress=False).compute_statistics(CAPTIONS[:-1])
        assert calls, "another caption set reused the cache"
        calls.clear()
        with torch.no_grad():
            editor.layout.layers[0].mlp.fc1.weight.mul_(1.1)
        changed = EMCIDEditor(pipe, fast_config, cache_dir=tmp_path, progress=False).compute_statistics(CAPTIONS)[
            "text_encoder"
        ]
        assert calls, "statistics of changed weights came from the cache"
        assert not torch.equal(first[0], changed[0])
    finally:
        handle.remove()


def test_edit_finds_cached_statistics_without_captions(pipe, fast_config, tmp_path):
    EMCIDEditor(pipe, fast_config, cache_dir=tmp_path, progress=False).compute_statistics(CAPTIONS)
    edits = EMCIDEditor(pipe, fast_config, cache_dir=tmp_path, progress=False).edit([("dog", "cat")])
    assert len(edits) == 1


def test_no_statistics_is_a_clear_error(pipe, fast_config, tmp_path):
    editor = EMCIDEditor(pipe, fast_config, cache_dir=tmp_path, progress=False)
    with pytest.raises(
        ValueError,
        match=r"No key statistics for layers \[0, 1, 2, 3\] of this text_encoder.*compute_statistics\(captions\)",
    ):
        editor.edit([("dog", "cat")])


def test_caption_sources(tmp_path):
    text = tmp_path / "captions.txt"
    text.write_text("a dog\n\na cat\n")
    assert load_captions(text) == ["a dog", "a cat"]
    lines = tmp_path / "captions.jsonl"
    lines.write_text("\n".join(json.dumps({"text": c}) for c in ["a dog", "a cat"]))
    assert load_captions(lines, column="text") == ["a dog", "a cat"]
    listing = tmp_path / "captions.json"
    listing.write_text(json.dumps(["a dog", "a cat"]))
    assert load_captions(str(listing)) == ["a dog", "a cat"]
    with pytest.raises(ValueError, match="not a file.*column='caption'"):
        load_captions("no-such-file.txt")
    with pytest.raises(ValueError, match="No captions"):
        load_captions([])
    subset = sample_captions([str(i) for i in range(100)], 10)
    assert len(subset) == 10 and subset == sample_captions([str(i) for i in range(100)], 10)


def test_layers_never_mix_caption_sets(pipe, fast_config, tmp_path):
    artists = type(fast_config)(**{**fast_config.to_dict(), "layers": "-2:-1"})
    EMCIDEditor(pipe, artists, cache_dir=tmp_path, progress=False).compute_statistics(CAPTIONS[:4])  # layer 3 only
    editor = EMCIDEditor(pipe, fast_config, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="No key statistics for layers \\[0, 1, 2, 3\\]"):
        editor.edit([("dog", "cat")])
    full = EMCIDEditor(pipe, fast_config, cache_dir=tmp_path, progress=False).compute_statistics(CAPTIONS)[
        "text_encoder"
    ]
    fresh = EMCIDEditor(pipe, fast_config, cache_dir=tmp_path, progress=False)
    found = fresh._statistics_of(fresh.encoders[0])
    assert all(torch.equal(found.covariances[layer], full[layer]) for layer in full)


def test_fingerprints_follow_in_place_changes(pipe):
    from diffusers_emcid.cache import ModuleFingerprints, fingerprint_module

    fingerprints = ModuleFingerprints()
    first = fingerprints(pipe.text_encoder)
    assert fingerprints(pipe.text_encoder) == first == fingerprint_module(pipe.text_encoder)
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[0, 0] += 1
    assert fingerprints(pipe.text_encoder) != first
