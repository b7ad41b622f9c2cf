"""Hyperparameters of EMCID and the presets that reproduce the paper's runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import diffusers

ResidualMode = Literal["paper", "memit"]
Stage1Mode = Literal["fast", "reference"]
Stage1Padding = Literal["longest", "pipeline"]
Stage2Keys = Literal["concept", "prompt"]
StatisticsPositions = Literal["paper", "pipeline"]
STATISTICS_POSITIONS: tuple[str, ...] = ("paper", "pipeline")
"""Which caption positions the key statistics cover; see `key_statistics`."""
LayerSpec = str | Sequence[int]
Stage = Literal["stage1", "stage2", "statistics", "run"]
"""The part of a run a field of `EMCIDConfig` belongs to, its `metadata["stage"]`."""


def resolve_layers(spec: LayerSpec, num_layers: int) -> list[int]:
    """Turns a layer spec into sorted layer indices of an encoder with `num_layers` layers.

    Args:
        spec: either a slice string `"start:stop"` over `range(num_layers)` (Python slice rules, so
            `"0:-1"` is every layer but the last, and `"-5:-1"` the four layers before the last), or a
            sequence of indices, where negative indices count from the end.
        num_layers: the depth of the text encoder.

    Returns:
        The layer indices, ascending and without repeats.
    """
    if isinstance(spec, str):
        parts = spec.split(":")
        try:
            bounds = [int(p) if p.strip() else None for p in parts]
        except ValueError:
            bounds = []
        if len(bounds) != 2:
            raise ValueError(f"layers={spec!r} is not a 'start:stop' slice; write e.g. '0:-1' or a list of ints.")
        layers = list(range(num_layers))[slice(*bounds)]
    else:
        layers = []
        for index in spec:
            if isinstance(index, bool) or not isinstance(index, int):
                raise TypeError(f"layers must hold ints, got {index!r} in {list(spec)!r}.")
            if not -num_layers <= index < num_layers:
                raise ValueError(
                    f"layer {index} is out of range for a text encoder with {num_layers} layers; "
                    f"use indices in [{-num_layers}, {num_layers - 1}] or a slice string like '0:-1'."
                )
            layers.append(index % num_layers)
        layers = sorted(set(layers))
    if not layers:
        raise ValueError(f"layers={spec!r} selects no layer of a text encoder with {num_layers} layers.")
    return layers


def resolve_edit_layers(spec: LayerSpec, z_layer: int | None, num_layers: int) -> tuple[list[int], int]:
    """`(edited layers ascending, z layer)` for an encoder of `num_layers` layers; the z layer defaults to the
    last edited layer and may not lie before it."""
    layers = resolve_layers(spec, num_layers)
    if z_layer is None:
        return layers, layers[-1]
    (resolved,) = resolve_layers([z_layer], num_layers)
    if resolved < layers[-1]:
        raise ValueError(
            f"z_layer={z_layer} lies before the last edited layer {layers[-1]}; "
            "the stage-1 vector must sit at or after "
            "every edited layer."
        )
    return layers, resolved


@dataclass(frozen=True)
class Stage1Key:
    """How a field of `EMCIDConfig` enters the stage-1 cache key (`EMCIDConfig.stage1_settings`), as its
    `metadata["stage1_key"]`.

    Args:
        entry: the name of the key's entry; `None` uses the field's name. Fields that share an entry form a tuple in
            field order, and the entry is `None` while the first of them is `None` (a switch such as
            `stopping_interval` that turns the others off).
        omit: values for which the entry is left out: the behaviour from before the field existed, so that vectors
            cached then keep their keys.
    """

    entry: str | None = None
    omit: tuple[Any, ...] = ()


@dataclass
class EMCIDConfig:
    """Every setting of an EMCID run. Symbols refer to the paper and to `docs/algorithm.md`.

    Each field explains itself in `metadata["help"]` (read it with `dataclasses.fields(EMCIDConfig)` or in
    `emcid edit --help`) and names its part of the run in `metadata["stage"]`:

    - `"stage1"`: the optimisation of one vector per concept: the edited layers and the z layer, Adam, the training
      images, early stopping;
    - `"stage2"`: the closed-form update of the edited layers: lambda, alpha, the residual and the keys;
    - `"statistics"`: the key covariance C;
    - `"run"`: how the work is done: the stage-1 mode, batch sizes, dtype and device.

    The fields with a `metadata["stage1_key"]` make up the cache key of the stage-1 vectors, see `stage1_settings`.
    The fields ending in `_2` concern SD-XL's second text encoder and are ignored for pipelines with one.
    """

    layers: LayerSpec = field(
        default="0:-1",
        metadata={
            "help": (
                "The text-encoder layers whose `mlp.fc2` is edited in stage 2, as a slice string over the encoder's "
                "layers or a list of indices (negative from the end). `'0:-1'` is layers 0-10 of CLIP-L (12 layers) "
                "and scales to any depth."
            ),
            "stage": "stage1",
        },
    )
    z_layer: int | None = field(
        default=None,
        metadata={
            "help": (
                "The layer whose output (the residual stream) receives the stage-1 vector; `None` means the last "
                "edited layer, as in the paper."
            ),
            "stage": "stage1",
        },
    )
    num_steps: int = field(
        default=200,
        metadata={"help": "Adam steps per concept (`v_num_grad_steps`).", "stage": "stage1", "stage1_key": Stage1Key()},
    )
    learning_rate: float = field(
        default=0.2,
        metadata={"help": "Adam learning rate for delta (`v_lr`).", "stage": "stage1", "stage1_key": Stage1Key()},
    )
    weight_decay: float = field(
        default=5e-4,
        metadata={
            "help": "Coefficient of `||delta|| / ||h0||^2` (`v_weight_decay`; the norm is not squared).",
            "stage": "stage1",
            "stage1_key": Stage1Key(),
        },
    )
    clamp_norm_factor: float = field(
        default=1.5,
        metadata={
            "help": "After every step delta is projected onto the ball of radius `clamp_norm_factor * ||h0||`.",
            "stage": "stage1",
            "stage1_key": Stage1Key(),
        },
    )
    text_alignment_weight: float = field(
        default=0.01,
        metadata={
            "help": (
                "Weight beta of the MSE between the edited source and the destination pooled text outputs "
                "(0 disables it)."
            ),
            "stage": "stage1",
            "stage1_key": Stage1Key(),
        },
    )
    samples_per_prompt: int = field(
        default=1,
        metadata={"help": "Training images per prompt template.", "stage": "stage1", "stage1_key": Stage1Key()},
    )
    image_num_inference_steps: int = field(
        default=50,
        metadata={
            "help": "Denoising steps used to generate the training images.",
            "stage": "stage1",
            "stage1_key": Stage1Key(),
        },
    )
    image_guidance_scale: float = field(
        default=7.5,
        metadata={
            "help": "Classifier-free guidance of the training-image generation.",
            "stage": "stage1",
            "stage1_key": Stage1Key(),
        },
    )
    image_scheduler: str | None = field(
        default=None,
        metadata={
            "help": (
                "The class name of a diffusers scheduler to draw the training images with (built from the "
                "pipeline's scheduler config, e.g. `'DPMSolverMultistepScheduler'` for fewer steps); `None` keeps the "
                "pipeline's own (SD 1.4: PNDM, which the paper used with 50 steps)."
            ),
            "stage": "stage1",
            "stage1_key": Stage1Key(),
        },
    )
    image_resolution: int | None = field(
        default=None,
        metadata={
            "help": "Side of the images drawn for training, in pixels; `None` uses the pipeline's default.",
            "stage": "stage1",
            "stage1_key": Stage1Key(),
        },
    )
    image_training_scale: float = field(
        default=1.0,
        metadata={
            "help": (
                "The training images are drawn at `image_resolution` and trained on at this fraction of it (given "
                "images are resized to that size, shorter side first, then centre-cropped); SD-XL's time ids describe "
                "the trained size. The authors drew SD-XL's images at 1024 and trained on them at 512 (0.5)."
            ),
            "stage": "stage1",
            "stage1_key": Stage1Key("training_scale", omit=(1.0,)),
        },
    )
    stage1_padding: Stage1Padding = field(
        default="longest",
        metadata={
            "help": (
                "How the UNet is conditioned in stage 1: `'longest'` (the paper's) pads each concept's prompts to the "
                "longest of them and masks the padding in the text encoder; `'pipeline'` pads every prompt to the "
                "tokenizer's length (77) without a mask, as the pipeline does at inference."
            ),
            "stage": "stage1",
            "stage1_key": Stage1Key("padding", omit=("longest",)),
        },
    )
    # The two stopping fields share the cache-key entry of the loss-window rule they replaced, which was also `None`
    # when off, so that vectors cached without a stopping rule keep their keys.
    stopping_interval: int | None = field(
        default=None,
        metadata={
            "help": (
                "Every `stopping_interval` steps, stop a concept whose delta moved by less than `stopping_tolerance` "
                "x ||h0|| since the check before (in every text encoder): the vector has converged. `None` (the "
                "paper's setting) runs all `num_steps`, which stay the limit."
            ),
            "stage": "stage1",
            "stage1_key": Stage1Key("early_stopping"),
        },
    )
    stopping_tolerance: float = field(
        default=0.1,
        metadata={
            "help": "How far (relative to ||h0||) delta may still move over an interval when a concept stops.",
            "stage": "stage1",
            "stage1_key": Stage1Key("early_stopping"),
        },
    )
    preservation_weight: float = field(
        default=4000.0,
        metadata={"help": "Lambda, the weight of the key covariance C (`mom2_update_weight`).", "stage": "stage2"},
    )
    edit_weight: float = field(
        default=0.6,
        metadata={
            "help": "Alpha in `dW = alpha R K^T ((1-alpha) lambda C + alpha K K^T)^-1`, in (0, 1).",
            "stage": "stage2",
        },
    )
    residual: ResidualMode = field(
        default="paper",
        metadata={
            "help": (
                "`'paper'` uses R = z - (fc2 output of the layer), as the authors' code does; `'memit'` uses "
                "R = z - (z-layer residual stream), MEMIT's consistent form."
            ),
            "stage": "stage2",
        },
    )
    stage2_keys: Stage2Keys = field(
        default="concept",
        metadata={
            "help": (
                "`'concept'` (the authors') writes one column per concept: its keys averaged over its prompts, target "
                "z; `'prompt'` writes one column per prompt, with the prompt's own key and target (its own clean state "
                "plus the concept's delta), weighted so that a concept weighs as much as one averaged column."
            ),
            "stage": "stage2",
        },
    )
    layers_2: LayerSpec = field(
        default="-6:-1",
        metadata={
            "help": (
                "The edited layers of SD-XL's second text encoder, as `layers`; `'-6:-1'` is layers 26-30 of "
                "OpenCLIP bigG (32 layers)."
            ),
            "stage": "stage1",
        },
    )
    z_layer_2: int | None = field(
        default=None,
        metadata={
            "help": "The z layer of SD-XL's second text encoder; `None` means its last edited layer.",
            "stage": "stage1",
        },
    )
    preservation_weight_2: float | None = field(
        default=None,
        metadata={
            "help": "The lambda of SD-XL's second text encoder; `None` means `preservation_weight`.",
            "stage": "stage2",
        },
    )
    statistics_num_samples: int = field(
        default=100_000,
        metadata={
            "help": "Captions used for C (a fixed pseudo-random subset if more are given).",
            "stage": "statistics",
        },
    )
    statistics_batch_size: int = field(
        default=100,
        metadata={"help": "Captions per forward pass when computing C.", "stage": "statistics"},
    )
    statistics_positions: StatisticsPositions = field(
        default="pipeline",
        metadata={
            "help": (
                "The caption positions C covers: `'pipeline'` (the default) tokenises the captions and the empty "
                "prompt as the pipeline does and includes the padding positions its UNet reads; `'paper'` covers the "
                "real tokens only, as the authors' statistics (see `key_statistics`)."
            ),
            "stage": "statistics",
        },
    )
    statistics_padding_weight: float = field(
        default=1.0,
        metadata={
            "help": (
                "With `'pipeline'` positions, the weight of the padding positions' mean key second moment against the "
                "real tokens' (1: padding and real tokens carry equal shares of C)."
            ),
            "stage": "statistics",
        },
    )
    statistics_regularization: float = field(
        default=0.0,
        metadata={
            "help": (
                "r >= 0; stage 2 uses `C + r * mean_eigenvalue(C) * I`, a ridge for key directions no caption "
                "covers. 0 (the paper's setting) uses C as it is, and numerically singular statistics are refused; a "
                "model with few distinct keys by design (the shipped shapes model) needs a small r."
            ),
            "stage": "statistics",
        },
    )
    stage1_mode: Stage1Mode = field(
        default="fast",
        metadata={
            "help": (
                "`'fast'` optimises `concept_batch_size` concepts together and runs only the text-encoder layers "
                "after the z layer at each step (the layers before it are computed once); `'reference'` is the plain "
                "path of the paper, one concept at a time with full text-encoder passes. Both give the same vectors "
                "up to floating-point rounding."
            ),
            "stage": "run",
        },
    )
    concept_batch_size: int = field(
        default=8,
        metadata={
            "help": (
                "Concepts optimised together in `'fast'` mode (one UNet batch of all their prompts); a concept's "
                "result does not depend on the others in its batch."
            ),
            "stage": "run",
        },
    )
    stage2_batch_size: int = field(
        default=256,
        metadata={"help": "Prompts per forward pass when gathering stage-2 keys and values.", "stage": "run"},
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": (
                "Autocast dtype for the frozen networks in stage 1 (`'bfloat16'`, `'float16'`) or `None` for the "
                "pipeline's own precision. Delta, its Adam state and the loss stay in float32 (float64 for a float64 "
                "pipeline)."
            ),
            "stage": "run",
            "stage1_key": Stage1Key(),
        },
    )
    device: str | None = field(
        default=None,
        metadata={
            "help": (
                "Where the work runs; `None` means the pipeline's device. Components are moved there for the "
                "duration of a call and moved back afterwards."
            ),
            "stage": "run",
        },
    )
    preset: str | None = field(
        default=None,
        compare=False,
        metadata={"help": "The preset the config was built from (set by `from_preset`); not compared.", "stage": "run"},
    )

    def __post_init__(self) -> None:
        for name in ("layers", "layers_2"):
            if not isinstance(getattr(self, name), str):
                setattr(self, name, tuple(getattr(self, name)))
        if self.image_resolution is not None and (
            isinstance(self.image_resolution, bool)
            or not isinstance(self.image_resolution, int)
            or self.image_resolution < 8
        ):
            raise ValueError(
                f"EMCIDConfig.image_resolution={self.image_resolution!r} must be None or an int of at least 8."
            )
        if not 0 < self.image_training_scale <= 1:
            raise ValueError(f"EMCIDConfig.image_training_scale={self.image_training_scale!r} must lie in (0, 1].")
        positive_ints = (
            "num_steps",
            "samples_per_prompt",
            "image_num_inference_steps",
            "statistics_num_samples",
            "statistics_batch_size",
            "stage2_batch_size",
            "concept_batch_size",
        )
        for name in positive_ints:
            value = getattr(self, name)
            minimum = 0 if name == "num_steps" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"EMCIDConfig.{name}={value!r} must be an int >= {minimum}.")
        for name in ("learning_rate", "clamp_norm_factor", "preservation_weight"):
            if not getattr(self, name) > 0:
                raise ValueError(f"EMCIDConfig.{name}={getattr(self, name)!r} must be > 0.")
        for name in (
            "weight_decay",
            "text_alignment_weight",
            "image_guidance_scale",
            "statistics_padding_weight",
            "statistics_regularization",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"EMCIDConfig.{name}={getattr(self, name)!r} must be >= 0.")
        if self.preservation_weight_2 is not None and not self.preservation_weight_2 > 0:
            raise ValueError(f"EMCIDConfig.preservation_weight_2={self.preservation_weight_2!r} must be > 0 or None.")
        if not 0 < self.edit_weight < 1:
            raise ValueError(
                f"EMCIDConfig.edit_weight={self.edit_weight!r} must lie strictly between 0 and 1 "
                "(alpha = 1 drops the preservation term and makes the stage-2 system singular)."
            )
        if self.stopping_interval is not None and (
            isinstance(self.stopping_interval, bool)
            or not isinstance(self.stopping_interval, int)
            or self.stopping_interval < 1
        ):
            raise ValueError(f"EMCIDConfig.stopping_interval={self.stopping_interval!r} must be an int >= 1 or None.")
        if not self.stopping_tolerance > 0:
            raise ValueError(f"EMCIDConfig.stopping_tolerance={self.stopping_tolerance!r} must be > 0.")
        if self.image_scheduler is not None and not (
            isinstance(getattr(diffusers, self.image_scheduler, None), type)
            and self.image_scheduler.endswith("Scheduler")
        ):
            raise ValueError(
                f"EMCIDConfig.image_scheduler={self.image_scheduler!r} is not a diffusers scheduler class; use a name "
                "such as 'DPMSolverMultistepScheduler', 'DDIMScheduler' or 'PNDMScheduler', or None."
            )
        if self.statistics_positions not in STATISTICS_POSITIONS:
            raise ValueError(
                f"EMCIDConfig.statistics_positions={self.statistics_positions!r} "
                f"must be one of {list(STATISTICS_POSITIONS)}."
            )
        if self.stage1_padding not in ("longest", "pipeline"):
            raise ValueError(f"EMCIDConfig.stage1_padding={self.stage1_padding!r} must be 'longest' or 'pipeline'.")
        if self.stage1_mode not in ("fast", "reference"):
            raise ValueError(f"EMCIDConfig.stage1_mode={self.stage1_mode!r} must be 'fast' or 'reference'.")
        if self.stage2_keys not in ("concept", "prompt"):
            raise ValueError(f"EMCIDConfig.stage2_keys={self.stage2_keys!r} must be 'concept' or 'prompt'.")
        if self.residual not in ("paper", "memit"):
            raise ValueError(f"EMCIDConfig.residual={self.residual!r} must be 'paper' or 'memit'.")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(f"EMCIDConfig.dtype={self.dtype!r} must be None, 'float32', 'float16' or 'bfloat16'.")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "EMCIDConfig":
        """Builds the config of a named preset (see `PRESETS`), with keyword overrides."""
        if name not in PRESETS:
            raise ValueError(f"Unknown EMCID preset {name!r}; choose one of {sorted(PRESETS)}.")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"EMCIDConfig has no field(s) {sorted(unknown)}.")
        return cls(**{**PRESETS[name], "preset": name, **overrides})

    def resolve_layers(self, num_layers: int) -> tuple[list[int], int]:
        """Returns `(edited layers ascending, z layer)` of the first text encoder, of `num_layers` layers."""
        return resolve_edit_layers(self.layers, self.z_layer, num_layers)

    def stage1_settings(self, z_layers: dict[str, int]) -> dict[str, Any]:
        """The settings a stage-1 vector depends on (its cache key): `z_layers` and the fields with a
        `metadata["stage1_key"]`, entered as their `Stage1Key` says. Lambda and alpha are not among them, nor are
        `stage1_mode` and `concept_batch_size`, which change how the vectors are computed, not what they are."""
        entries: dict[str, list[Any]] = {}
        for config_field in dataclasses.fields(self):
            key: Stage1Key | None = config_field.metadata.get("stage1_key")
            value = getattr(self, config_field.name)
            if key is not None and value not in key.omit:
                entries.setdefault(key.entry or config_field.name, []).append(value)
        settings: dict[str, Any] = {"z_layers": z_layers}
        for entry, values in entries.items():
            settings[entry] = values[0] if len(values) == 1 else None if values[0] is None else tuple(values)
        return settings

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("layers", "layers_2"):
            if not isinstance(data[name], str):
                data[name] = list(data[name])
        return data


SD1_PAPER: dict[str, Any] = dict(
    layers="0:-1",
    num_steps=200,
    learning_rate=0.2,
    weight_decay=5e-4,
    clamp_norm_factor=1.5,
    text_alignment_weight=0.01,
    preservation_weight=4000.0,
    edit_weight=0.6,
)
"""SD 1.4 default of the authors' scripts (hparams `dest_s-200_c-1.5_ly-11_lr-0.2_wd-5e-04_txt-align-0.01`, lambda =
4000, alpha = 0.6 as in the AICE runs): layers 0-10 of CLIP-L, z layer 10. The other SD 1.x presets change it."""

PRESETS: dict[str, dict[str, Any]] = {
    "sd1-paper": SD1_PAPER,
    # Debiasing (the authors' debias script): alpha = 0.5, used both while tuning the blend factors and in the final
    # joint solve.
    "sd1-debias": {**SD1_PAPER, "edit_weight": 0.5},
    # Rectification with real images (`dest_s-300_..._true_noise_loss`, the hparams file the authors ship for it):
    # 300 steps, 3 images per template, no text-alignment term (`cal_text_repr_loss: false`), alpha = 0.5.
    "sd1-rectify": {
        **SD1_PAPER,
        "num_steps": 300,
        "text_alignment_weight": 0.0,
        "samples_per_prompt": 3,
        "edit_weight": 0.5,
    },
    # Artist-style erasure (`..._ly-7-11_...`): layers 7-10 of CLIP-L, 100 steps, alpha = 0.5.
    "sd1-artists": {**SD1_PAPER, "layers": "-5:-1", "num_steps": 100, "edit_weight": 0.5},
    # The paper's settings with a stage 1 that stops each concept once its vector has converged (every 5 steps, a
    # move of delta under 0.1 ||h0||; 200 steps stay the limit) and training images drawn by DPM-Solver++ in 20
    # steps. On the shipped models this kept the quality of 200 steps with a quarter of the steps
    # (benchmarks/README.md, `bench_steps.py`).
    "sd1-fast": {
        **SD1_PAPER,
        "stopping_interval": 5,
        "stopping_tolerance": 0.1,
        "image_scheduler": "DPMSolverMultistepScheduler",
        "image_num_inference_steps": 20,
    },
    # SD-XL (`sdxl-dest_s-100_c-1.2_ly-8-11_ly2-26-31_lr-0.1_wd-8e-03_txt-align-0.01`, whose text weight is in fact
    # 0.005): CLIP-L layers 8-10 and OpenCLIP-bigG layers 26-30, the layers whose outputs SD-XL feeds its UNet;
    # lambda 4000 for the first encoder and 10000 for the second, alpha = 0.5. Images are drawn at the pipeline's
    # size (1024) and trained on at half of it (512), as the authors did, with time ids that describe 512 (theirs
    # said 1024).
    "sdxl-paper": dict(
        layers="-4:-1",
        layers_2="-6:-1",
        num_steps=100,
        learning_rate=0.1,
        weight_decay=8e-3,
        clamp_norm_factor=1.2,
        text_alignment_weight=0.005,
        preservation_weight=4000.0,
        preservation_weight_2=10000.0,
        edit_weight=0.5,
        image_training_scale=0.5,
    ),
    # The shipped shapes model (`diffusers_emcid.shapes`): its first two layers have no attention output, so a word's
    # states there are context-free and an edit of their fc2 reaches every later position; few captions exist, so
    # lambda is small, and the MEMIT residual suits an edit before any attention. Its context-free layers have few
    # distinct keys (one per token and position: C of layer 0 is singular, 69 of 256 eigenvalues at float32 noise,
    # down to -6e-6 of the mean), so a ridge of 1e-4 of the mean eigenvalue, well above that noise, covers the rest.
    "shapes-demo": dict(
        layers=(0, 1),
        num_steps=30,
        learning_rate=0.2,
        weight_decay=5e-4,
        clamp_norm_factor=1.5,
        text_alignment_weight=0.01,
        samples_per_prompt=2,
        image_num_inference_steps=20,
        image_guidance_scale=4.0,
        preservation_weight=10.0,
        edit_weight=0.6,
        residual="memit",
        statistics_num_samples=1000,
        statistics_batch_size=256,
        statistics_regularization=1e-4,
    ),
}
# The shipped many-concept model (`diffusers_emcid.shapes.names`): the shapes model's settings, with key statistics
# over all of its 1,944 captions (`names_statistics_captions`: every name under every name template, and the
# shapes captions), one training image per template drawn with 5 sampler steps, 32 concepts at a time, and 15
# steps at a learning rate of 0.4 (benchmarks/README.md). Images: on 16 names one image per template and 10 sampler
# steps gave efficacy 0.81 at 1.6 s per concept, against 0.82 at 2.7 s with the shapes preset's 2 images and 20
# sampler steps; on 32 names rebound at once 5 sampler steps give efficacy 0.877 and generality 0.919 at 1.7 s per
# concept, 10 give 0.875 / 0.927 at 2.0 s. Steps (32 names, 10 sampler steps): lr 0.4 at 15 steps gives 0.875 /
# 0.927, lr 0.2 gives 0.828 / 0.920 at 20 steps and 0.884 / 0.921 at 200. One stage-2 column per prompt: a name's
# context-free keys differ by position, so the mean over prompts with the name at positions 1 to 4 serves none of
# them (K = 100 at lr 0.2: efficacy 0.16 with one column per concept, 0.83 with one per prompt). Lambda 1000, not
# the shapes preset's 10: K K^T grows with the number of edited keys while C is a mean, and at lambda 10 the update
# overran what it must keep beyond 100 names (K = 200: the control names lost 38 points; with lambda 1000 1.3 at
# efficacy 0.86, and at K = 400 0.3 at efficacy 0.89; K = 100: efficacy 0.87 either way; benchmarks/README.md).
PRESETS["shapes-names"] = {
    **PRESETS["shapes-demo"],
    "preservation_weight": 1000.0,
    "num_steps": 15,
    "learning_rate": 0.4,
    "samples_per_prompt": 1,
    "image_num_inference_steps": 5,
    "concept_batch_size": 32,
    "statistics_num_samples": 1944,
    "stage2_keys": "prompt",
}
