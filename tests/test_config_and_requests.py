import pytest

from diffusers_emcid import DEFAULT_TEMPLATES, PRESETS, ConceptEdit, EMCIDConfig
from diffusers_emcid.config import resolve_layers
from diffusers_emcid.requests import as_concept_edits


def test_paper_preset_matches_the_spec():
    config = EMCIDConfig.from_preset("sd1-paper")
    assert config.resolve_layers(12) == (list(range(11)), 10)
    assert (config.num_steps, config.learning_rate, config.weight_decay, config.clamp_norm_factor) == (200, 0.2, 5e-4, 1.5)
    assert (config.text_alignment_weight, config.preservation_weight, config.edit_weight) == (0.01, 4000.0, 0.6)
    assert (config.samples_per_prompt, config.image_num_inference_steps, config.image_guidance_scale) == (1, 50, 7.5)
    assert config.residual == "paper" and config.statistics_num_samples == 100_000


def test_artists_preset_matches_the_spec():
    config = EMCIDConfig.from_preset("sd1-artists")
    assert config.resolve_layers(12) == ([7, 8, 9, 10], 10)
    assert (config.num_steps, config.edit_weight) == (100, 0.5)


@pytest.mark.parametrize("depth", [4, 5, 23, 24, 32])
def test_presets_scale_to_other_depths(depth):
    for name in set(PRESETS) - {"shapes-demo"}:  # the shapes model's preset names its two layers
        layers, z_layer = EMCIDConfig.from_preset(name).resolve_layers(depth)
        assert layers and z_layer == layers[-1] == depth - 2 and all(0 <= l < depth for l in layers)


def test_layer_specs():
    assert resolve_layers([0, -2, 3, 3], 5) == [0, 3]
    assert resolve_layers("1:3", 5) == [1, 2]
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers([12], 12)
    with pytest.raises(ValueError, match="selects no layer"):
        resolve_layers("5:2", 12)
    with pytest.raises(ValueError, match="slice"):
        resolve_layers("all", 12)


def test_unknown_preset_and_bad_values():
    with pytest.raises(ValueError, match="Unknown EMCID preset 'sd9'.*sd1-paper"):
        EMCIDConfig.from_preset("sd9")
    with pytest.raises(TypeError, match="no field"):
        EMCIDConfig.from_preset("sd1-paper", steps=3)
    with pytest.raises(ValueError, match="edit_weight"):
        EMCIDConfig(edit_weight=1.0)
    with pytest.raises(ValueError, match="residual"):
        EMCIDConfig(residual="other")
    with pytest.raises(ValueError, match="z_layer"):
        EMCIDConfig(layers=[3, 4], z_layer=2).resolve_layers(12)


def test_tuple_shorthand_uses_the_paper_templates():
    (edit,) = as_concept_edits([("dog", "cat")])
    assert edit.templates == DEFAULT_TEMPLATES == ("An image of {}", "A photo of {}", "{}")
    assert edit.source_prompts == ["An image of dog", "A photo of dog", "dog"]
    assert edit.destination_prompts == ["An image of cat", "A photo of cat", "cat"]


def test_default_seed_is_a_stable_hash_of_the_request():
    a, b = ConceptEdit("dog", "cat"), ConceptEdit("dog", "cat")
    assert a.resolved_seed == b.resolved_seed
    assert ConceptEdit("dog", "cow").resolved_seed != a.resolved_seed
    assert ConceptEdit("dog", "cat", seed=7).resolved_seed == 7
    assert ConceptEdit("dog", "cat", templates=["a {}"]).fingerprint() != a.fingerprint()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(source="", destination="cat"), ValueError, "empty"),
        (dict(source="  ", destination="cat"), ValueError, "empty"),
        (dict(source=3, destination="cat"), TypeError, "source must be a str"),
        (dict(source="dog", destination=None), TypeError, "destination must be a str"),
        (dict(source="Dog", destination="dog"), ValueError, "the same"),
        (dict(source="dog", destination="cat", templates=["a photo"]), ValueError, "'a photo'.*\\{\\}"),
        (dict(source="dog", destination="cat", templates=["{} and {}"]), ValueError, "exactly one"),
        (dict(source="dog", destination="cat", templates=[]), ValueError, "templates is empty"),
        (dict(source="dog", destination="cat", templates="a {}"), TypeError, "sequence of str"),
        (dict(source="dog", destination="cat", seed=-1), ValueError, "seed"),
    ],
)
def test_bad_requests(kwargs, error, message):
    with pytest.raises(error, match=message):
        ConceptEdit(**kwargs)


def test_wrong_image_count_names_the_fix():
    from PIL import Image

    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="2 images for 3 templates.*multiple of 3"):
        ConceptEdit("dog", "cat", images=[image, image])
    assert len(ConceptEdit("dog", "cat", images=[image] * 6).images) == 6


def test_request_lists():
    with pytest.raises(ValueError, match="both edit the source 'Dog'"):
        as_concept_edits([("dog", "cat"), ("Dog", "cow")])
    with pytest.raises(ValueError, match="No requests"):
        as_concept_edits([])
    with pytest.raises(TypeError, match="not a single request"):
        as_concept_edits(("dog", "cat"))
    with pytest.raises(TypeError, match="Request 1"):
        as_concept_edits([("dog", "cat"), "cow"])


def test_a_single_path_is_one_image(tmp_path):
    from pathlib import Path

    from PIL import Image

    path = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(path)
    assert ConceptEdit("dog", "cat", templates=["{}"], images=Path(path)).images == (Path(path),)
