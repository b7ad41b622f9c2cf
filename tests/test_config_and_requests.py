import dataclasses
import typing

import pytest

from diffusers_emcid import DEFAULT_TEMPLATES, PRESETS, ConceptEdit, EMCIDConfig
from diffusers_emcid.cache import digest
from diffusers_emcid.config import Stage, resolve_edit_layers, resolve_layers
from diffusers_emcid.requests import as_concept_edits

Z_LAYERS = {"text_encoder": 10, "text_encoder_2": 30}
STAGE1_KEY_FIELDS = {
    "num_steps",
    "learning_rate",
    "weight_decay",
    "clamp_norm_factor",
    "text_alignment_weight",
    "samples_per_prompt",
    "image_num_inference_steps",
    "image_guidance_scale",
    "image_scheduler",
    "image_resolution",
    "image_training_scale",
    "stage1_padding",
    "stopping_interval",
    "stopping_tolerance",
    "dtype",
}
"""The fields a stage-1 vector depends on besides its z layers, listed independently of their metadata."""
Z_LAYER_FIELDS = {"layers", "z_layer", "layers_2", "z_layer_2"}
"""The fields that reach the stage-1 key through the z layers they resolve to."""
CHANGED = {
    "layers": "0:-2",
    "z_layer": 11,
    "num_steps": 100,
    "learning_rate": 0.1,
    "weight_decay": 1e-3,
    "clamp_norm_factor": 1.2,
    "text_alignment_weight": 0.0,
    "samples_per_prompt": 2,
    "image_num_inference_steps": 20,
    "image_guidance_scale": 4.0,
    "image_scheduler": "DDIMScheduler",
    "image_resolution": 64,
    "image_training_scale": 0.5,
    "stage1_padding": "pipeline",
    "stopping_interval": 6,
    "stopping_tolerance": 0.05,
    "preservation_weight": 10.0,
    "edit_weight": 0.5,
    "residual": "memit",
    "stage2_keys": "prompt",
    "layers_2": "-7:-2",
    "z_layer_2": 31,
    "preservation_weight_2": 10.0,
    "statistics_num_samples": 10,
    "statistics_batch_size": 10,
    "statistics_positions": "paper",
    "statistics_padding_weight": 0.5,
    "statistics_regularization": 1e-4,
    "stage1_mode": "reference",
    "concept_batch_size": 2,
    "stage2_batch_size": 16,
    "dtype": "float16",
    "device": "cpu",
    "preset": "sd1-paper",
}
"""Another valid value of every field."""


def test_paper_preset_matches_the_spec():
    config = EMCIDConfig.from_preset("sd1-paper")
    assert config.resolve_layers(12) == (list(range(11)), 10)
    assert (config.num_steps, config.learning_rate, config.weight_decay, config.clamp_norm_factor) == (
        200,
        0.2,
        5e-4,
        1.5,
    )
    assert (config.text_alignment_weight, config.preservation_weight, config.edit_weight) == (0.01, 4000.0, 0.6)
    assert (config.samples_per_prompt, config.image_num_inference_steps, config.image_guidance_scale) == (1, 50, 7.5)
    assert config.residual == "paper" and config.statistics_num_samples == 100_000


def test_artists_preset_matches_the_spec():
    config = EMCIDConfig.from_preset("sd1-artists")
    assert config.resolve_layers(12) == ([7, 8, 9, 10], 10)
    assert (config.num_steps, config.edit_weight) == (100, 0.5)


@pytest.mark.parametrize("depth", [4, 5, 23, 24, 32])
def test_presets_scale_to_other_depths(depth):
    for name in (n for n, p in PRESETS.items() if not isinstance(p["layers"], tuple)):  # not the shapes models'
        layers, z_layer = EMCIDConfig.from_preset(name).resolve_layers(depth)
        assert layers and z_layer == layers[-1] == depth - 2 and all(0 <= layer < depth for layer in layers)


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


def test_every_field_has_help_and_a_stage():
    for config_field in dataclasses.fields(EMCIDConfig):
        assert config_field.metadata["help"].strip(), config_field.name
        assert config_field.metadata["stage"] in typing.get_args(Stage), config_field.name


def test_each_field_changes_the_stage1_key_exactly_when_marked_for_it():
    fields = dataclasses.fields(EMCIDConfig)
    assert set(CHANGED) == {config_field.name for config_field in fields}, "give a new field a value in CHANGED"
    marked = {config_field.name for config_field in fields if "stage1_key" in config_field.metadata}
    base = EMCIDConfig(stopping_interval=5)  # so that the stopping tolerance counts

    def z_layers(config: EMCIDConfig) -> tuple[int, int]:
        return config.resolve_layers(12)[1], resolve_edit_layers(config.layers_2, config.z_layer_2, 32)[1]

    changing_key, moving_z = set(), set()
    for name, value in CHANGED.items():
        assert getattr(base, name) != value, name
        config = dataclasses.replace(base, **{name: value})
        if config.stage1_settings(Z_LAYERS) != base.stage1_settings(Z_LAYERS):
            changing_key.add(name)
        if z_layers(config) != z_layers(base):
            moving_z.add(name)
    assert changing_key == marked == STAGE1_KEY_FIELDS
    assert moving_z == Z_LAYER_FIELDS
    assert {"num_steps", "learning_rate", "dtype"} <= marked and not {"edit_weight", "stage1_mode"} & marked
    without_interval = EMCIDConfig(stopping_tolerance=0.5)  # the tolerance counts only with an interval
    assert without_interval.stage1_settings(Z_LAYERS) == EMCIDConfig().stage1_settings(Z_LAYERS)


def test_stage1_settings_keep_their_entries():
    config = EMCIDConfig.from_preset("sdxl-paper", stopping_interval=5, stage1_padding="pipeline")
    assert config.stage1_settings(Z_LAYERS) == {
        "z_layers": Z_LAYERS,
        "num_steps": 100,
        "learning_rate": 0.1,
        "weight_decay": 8e-3,
        "clamp_norm_factor": 1.2,
        "text_alignment_weight": 0.005,
        "samples_per_prompt": 1,
        "image_num_inference_steps": 50,
        "image_guidance_scale": 7.5,
        "image_scheduler": None,
        "image_resolution": None,
        "dtype": None,
        "early_stopping": (5, 0.1),
        "padding": "pipeline",
        "training_scale": 0.5,
    }


@pytest.mark.parametrize(
    "preset, overrides, z_layers, expected",
    [
        ("sd1-paper", {}, {"text_encoder": 10}, "5f1a73ae3e0da585b782c594d7bde87d081830f80f0527851453c86b362c1305"),
        ("sd1-rectify", {}, {"text_encoder": 10}, "d112b7281e0249b50b5e1f65b3792491b91ae275ce5f50d7a13011aa3c6a3ca9"),
        ("sd1-artists", {}, {"text_encoder": 10}, "ce2b011fd14a2bcc070aba0897c41ca2a47c46397377276d6793cc581033c137"),
        ("shapes-demo", {}, {"text_encoder": 10}, "3935447e390ca24b5d090ae59c95722b860ed1ee5942ef54a3d619aec46b60f0"),
        ("sdxl-paper", {}, Z_LAYERS, "a419e6bac00f250ab950a9ca1f3fc6fe383083868d5a95a3ae5272dee4b02904"),
        (
            "sd1-paper",
            {"stage1_padding": "pipeline"},
            {"text_encoder": 10},
            "e47fb35df235f34ef9c0cdccb64249187b3ee8f66c750f3463c013a698fee8f8",
        ),
        (
            "sd1-paper",
            {"image_scheduler": "DDIMScheduler", "image_resolution": 256, "dtype": "bfloat16"},
            {"text_encoder": 10},
            "4c0d2f43464d11d9c3550be9c8fc7b7ac389ec03e600d9612d39a2b1044da3b5",
        ),
    ],
)
def test_stage1_cache_keys_of_earlier_versions_stay_valid(preset, overrides, z_layers, expected):
    assert digest(EMCIDConfig.from_preset(preset, **overrides).stage1_settings(z_layers)) == expected
