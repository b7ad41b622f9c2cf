"""Random sequences of concept-edit controls on one pipeline agree with a model of their documented effect.

Each example drives one tiny pipeline through a random sequence of: load edit set A or B, set a strength,
disable / enable one or all, fuse / unfuse, unload one or all, and load / delete a diffusers LoRA ("style",
on the text encoder's attention and the UNet). A model keeps the expected state (loaded sets with strength,
enabled, fused; whether the style LoRA is loaded). After every operation:

- `get_concept_edits()` agrees with the model;
- the text encoder's outputs equal those of a REFERENCE pipeline (same seed, the style LoRA loaded when
  expected) whose fc2 weights are set densely to base + sum of strength * up @ down over the loaded and
  enabled (or fused) sets: bitwise when no edit set contributes, else within `OUTPUT_ATOL`;
- an operation the API refuses (an unknown or taken name, changing a fused set) raises ValueError and leaves
  everything as it was (`get_concept_edits()`, weights, outputs bitwise).

An operation that would leave a fused set next to another active set may be refused the same way (the
implementation may not support it), but if it succeeds the outputs must match the model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline
from hypothesis import example, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

import diffusers_emcid  # noqa: F401  (adds the pipeline methods)
from diffusers_emcid import ConceptEdits, EMCIDConfig, EMCIDEditor
from diffusers_emcid.encoders import find_text_encoder_layout
from diffusers_emcid.testing import tiny_sd_pipeline

from .conftest import CAPTIONS, FUZZ_SETTINGS

PROMPTS = ["a photo of a dog", "an apple", "a red car", "a green tree in the park"]
STRENGTHS = [0.0, 0.25, 0.5, 1.0, 1.5]
# LoRA (base(x) + s * B(A(x))) and dense ((W + s * B @ A) x) round differently in float32, so 1e-6 is too tight:
# over every reachable unfused state (A and/or B in either load order, each strength of STRENGTHS, with and
# without the style LoRA: 122 states) the worst difference is 2.04e-5 = 50 float32 ulps of the largest output
# entry (3.4), at A 1.5 + B 1.0. The bound is twice that, 100 ulps (4e-5 here), against an effect of 0.45 for
# the weakest edit tested (B at strength 0.25).
OUTPUT_RTOL_ULPS = 100


# ----------------------------------------------------------------------------------------------- the model


@dataclass
class EditSet:
    strength: float = 1.0
    enabled: bool = True
    fused: bool = False


@dataclass
class Model:
    sets: dict[str, EditSet] = field(default_factory=dict)  # in load order
    style: bool = False

    def copy(self) -> "Model":
        return Model({name: replace(s) for name, s in self.sets.items()}, self.style)

    def contributions(self) -> tuple[tuple[str, float], ...]:
        return tuple((name, s.strength) for name, s in self.sets.items() if s.enabled)

    def mixes_fused_and_active(self) -> bool:
        return any(s.fused for s in self.sets.values()) and len(self.contributions()) >= 2

    def info(self) -> dict[str, tuple[float, bool, bool]]:
        return {name: (s.strength, s.enabled, s.fused) for name, s in self.sets.items()}


def predict(model: Model, op: tuple) -> tuple[str, Model]:
    """(outcome, model after the op); outcome is 'ok', 'refused' (must raise ValueError and change nothing) or
    'skip' (not run). The rules: while a set is fused no other set may become active (PEFT computes a fused
    layer without its other adapters), only one set can be fused, and diffusers' `load_lora_weights` makes the
    new LoRA the only active adapter (switching the edit sets off)."""
    new = model.copy()
    sets, kind = new.sets, op[0]
    any_fused = any(s.fused for s in sets.values())
    if kind in ("style_load", "style_delete"):
        if model.style == (kind == "style_load") or (kind == "style_load" and any_fused):
            return "skip", model
        new.style = kind == "style_load"
        if kind == "style_load":
            for s in sets.values():
                s.enabled = False
        return "ok", new
    if kind == "load":
        if op[1] in sets or any_fused:
            return "refused", model
        sets[op[1]] = EditSet()
    elif kind == "strength":
        if op[1] not in sets or any_fused:
            return "refused", model
        sets[op[1]].strength, sets[op[1]].enabled = op[2], True
    elif kind == "strength_all":
        if any_fused:
            return "refused", model
        for s in sets.values():
            s.strength, s.enabled = op[1], True
    else:
        target = op[1]
        if target is not None and target not in sets:
            return "refused", model
        names = list(sets) if target is None else [target]
        if kind == "enable":
            if any_fused and any(not sets[name].enabled for name in names):
                return "refused", model
            for name in names:
                sets[name].enabled = True
        elif kind == "disable":
            if any(sets[name].fused for name in names):
                return "refused", model
            for name in names:
                sets[name].enabled = False
        elif kind == "fuse":
            candidates = [n for n in names if sets[n].enabled and not sets[n].fused]
            others = [n for n in sets if n not in candidates and sets[n].enabled]
            if candidates and (len(candidates) > 1 or others):
                return "refused", model
            for name in candidates:
                sets[name].fused = True
        elif kind == "unfuse":
            for name in names:
                sets[name].fused = False
        elif kind == "unload":
            for name in names:
                del sets[name]
        else:
            raise AssertionError(op)
    return "ok", new


NAMES = st.sampled_from(["A", "B"])
TARGETS = st.none() | NAMES  # None: all loaded edit sets
OPS = st.one_of(
    st.tuples(st.just("load"), NAMES),
    st.tuples(st.just("strength"), NAMES, st.sampled_from(STRENGTHS)),
    st.tuples(st.just("strength_all"), st.sampled_from(STRENGTHS)),
    st.tuples(st.just("disable"), TARGETS),
    st.tuples(st.just("enable"), TARGETS),
    st.tuples(st.just("fuse"), TARGETS),
    st.tuples(st.just("unfuse"), TARGETS),
    st.tuples(st.just("unload"), TARGETS),
    st.just(("style_load",)),
    st.just(("style_delete",)),
)
SEQUENCES = st.lists(OPS, min_size=1, max_size=12)


# ----------------------------------------------------------------------------------------------- pipelines


def save_style_lora(path: Path) -> Path:
    """A diffusers LoRA on the UNet and the text encoder's attention (as `style_lora` in test_loaders.py)."""
    source = tiny_sd_pipeline(seed=0)
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], init_lora_weights=False
    )
    inject_adapter_in_model(config, source.text_encoder, adapter_name="default")
    source.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    )
    StableDiffusionPipeline.save_lora_weights(
        path,
        unet_lora_layers=get_peft_model_state_dict(source.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(source.text_encoder),
    )
    return path


def fc2_weights(pipe) -> list[torch.Tensor]:
    layout = find_text_encoder_layout(pipe.text_encoder)
    return [layout.fc2(layer).weight for layer in range(layout.num_layers)]


class Toggling:
    """The pipeline under test, the saved edit sets and the reference pipelines."""

    def __init__(self, workdir: Path) -> None:
        editor_pipe = tiny_sd_pipeline(seed=0)
        # conftest's fast_config
        config = EMCIDConfig.from_preset("sd1-paper", num_steps=8, image_num_inference_steps=2)
        editor = EMCIDEditor(editor_pipe, config, cache_dir=workdir / "cache", progress=False)
        editor.compute_statistics(CAPTIONS)
        self.folders = {
            "A": editor.edit([("dog", "cat"), ("apple", "banana")]).save_pretrained(workdir / "A"),
            "B": editor.edit([("car", "tree")]).save_pretrained(workdir / "B"),
        }
        self.deltas = {
            name: ConceptEdits.from_pretrained(folder).deltas["text_encoder"] for name, folder in self.folders.items()
        }
        self.style = save_style_lora(workdir / "style")
        self.references = {False: tiny_sd_pipeline(seed=0), True: tiny_sd_pipeline(seed=0)}
        self.quiet(self.references[True].load_lora_weights, str(self.style), adapter_name="style")
        self.base_fc2 = [w.detach().clone() for w in fc2_weights(self.references[False])]
        tokenizer = editor_pipe.tokenizer
        self.ids = tokenizer(
            PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        self.cache: dict[Any, torch.Tensor] = {}
        self.pipe = tiny_sd_pipeline(seed=0)
        self.pristine = self.state()
        self.base = self.encode()
        assert torch.equal(self.base, self.expected(Model()))
        self.worst = 0.0  # largest difference to the reference seen, in ulps of the output scale

    @staticmethod
    def quiet(function, *args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return function(*args, **kwargs)

    def encode(self, pipe=None) -> torch.Tensor:
        with torch.no_grad():
            return (pipe or self.pipe).text_encoder(self.ids)[0]

    def state(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{key}": value.detach().clone()
            for name in ("text_encoder", "unet")
            for key, value in getattr(self.pipe, name).state_dict().items()
        }

    def expected(self, model: Model) -> torch.Tensor:
        """The reference outputs: the style LoRA as expected, fc2 = base + sum of strength * up @ down, densely."""
        key = (model.style, model.contributions())
        if key not in self.cache:
            reference = self.references[model.style]
            with torch.no_grad():
                for layer, weight in enumerate(fc2_weights(reference)):
                    dense = self.base_fc2[layer].clone()
                    for name, strength in model.contributions():
                        delta = self.deltas[name].get(layer)
                        if delta is not None:
                            dense += strength * (delta.up @ delta.down)
                    weight.copy_(dense)
                self.cache[key] = self.encode(reference)
                for layer, weight in enumerate(fc2_weights(reference)):
                    weight.copy_(self.base_fc2[layer])
        return self.cache[key]

    def start(self) -> None:
        """A fresh pipeline unless the shared one is exactly as built (PEFT wrappers left by diffusers' delete_adapters
        or a failed example would make examples depend on each other)."""
        now = self.state()
        if (
            now.keys() != self.pristine.keys()
            or any(not torch.equal(now[k], v) for k, v in self.pristine.items())
            or self.pipe.get_concept_edits()
            or getattr(self.pipe.text_encoder, "peft_config", None)
            or getattr(self.pipe.unet, "peft_config", None)
        ):
            self.pipe = tiny_sd_pipeline(seed=0)

    def execute(self, op: tuple, model: Model) -> None:
        pipe, kind = self.pipe, op[0]
        if kind == "load":
            pipe.load_concept_edits(self.folders[op[1]], adapter_name=op[1])
        elif kind == "strength":
            pipe.set_concept_edits(op[1], op[2])
        elif kind == "strength_all":
            names = list(model.sets)
            pipe.set_concept_edits(names, [op[1]] * len(names))
        elif kind == "disable":
            pipe.disable_concept_edits(op[1])
        elif kind == "enable":
            pipe.enable_concept_edits(op[1])
        elif kind == "fuse":
            pipe.fuse_concept_edits(op[1])
        elif kind == "unfuse":
            pipe.unfuse_concept_edits(op[1])
        elif kind == "unload":
            pipe.unload_concept_edits(op[1])
        elif kind == "style_load":
            self.quiet(pipe.load_lora_weights, str(self.style), adapter_name="style")
        elif kind == "style_delete":
            self.quiet(pipe.delete_adapters, "style")
        else:
            raise AssertionError(op)

    def check(self, model: Model, where: str) -> None:
        info = {name: (i["strength"], i["enabled"], i["fused"]) for name, i in self.pipe.get_concept_edits().items()}
        assert info == model.info(), f"{where}: get_concept_edits() says {info}, expected {model.info()}"
        output, expected = self.encode(), self.expected(model)
        if not model.contributions():
            assert torch.equal(output, expected), (
                f"{where}: no edit set is active but the outputs differ from the reference by "
                f"{(output - expected).abs().max().item():.3g} (expected bitwise equality)"
            )
        else:
            difference = (output - expected).abs().max().item()
            ulp = torch.finfo(torch.float32).eps * expected.abs().max().item()
            self.worst = max(self.worst, difference / ulp)
            assert difference <= OUTPUT_RTOL_ULPS * ulp, (
                f"{where}: outputs differ from the reference (expected {model.contributions()}, style "
                f"{model.style}) by {difference:.3g} > {OUTPUT_RTOL_ULPS} ulps of the output scale "
                f"({OUTPUT_RTOL_ULPS * ulp:.3g})"
            )

    def run(self, ops: list[tuple]) -> None:
        self.start()
        model = Model()
        self.check(model, "at the start")
        for step, op in enumerate(ops):
            outcome, after = predict(model, op)
            if outcome == "skip":
                continue
            where = f"after step {step} {op}"
            before_info, before_state, before_output = self.pipe.get_concept_edits(), self.state(), self.encode()
            try:
                self.execute(op, model)
            except ValueError as error:
                assert outcome == "refused", f"{where}: raised {error!r}, but it should succeed"
                assert self.pipe.get_concept_edits() == before_info, (
                    f"{where}: refused ({error}) but get_concept_edits() changed from {before_info} to "
                    f"{self.pipe.get_concept_edits()}"
                )
                now = self.state()
                unchanged = now.keys() == before_state.keys() and all(
                    torch.equal(now[k], v) for k, v in before_state.items()
                )
                assert unchanged, f"{where}: refused ({error}) but the weights changed"
                assert torch.equal(self.encode(), before_output), f"{where}: refused ({error}) but the outputs changed"
            else:
                assert outcome != "refused", f"{where}: should have raised ValueError"
                model = after
                if op[0] in ("style_load", "style_delete"):
                    # diffusers' and PEFT's own rules decide which adapters stay active (a new LoRA becomes the only
                    # active one; deleting the only active one activates a remaining one): the model adopts what
                    # get_concept_edits() reports, and the outputs must then match it exactly
                    for name, info in self.pipe.get_concept_edits().items():
                        model.sets[name].enabled = info["enabled"]
            self.check(model, where)
        # back to base: unload everything
        self.pipe.unload_concept_edits()
        if model.style:
            self.execute(("style_delete",), model)
        assert self.pipe.get_concept_edits() == {}
        assert torch.equal(self.encode(), self.base), (
            "after unloading everything the outputs are not the base ones bitwise"
        )


@pytest.fixture(scope="module")
def toggling(tmp_path_factory) -> Toggling:
    return Toggling(tmp_path_factory.mktemp("toggle"))


# ----------------------------------------------------------------------------------------------- known bugs

# Sequences that showed bugs before the toggles were fixed (each ran into PEFT re-activating or ignoring
# adapters, or a refusal after a partial change); they run first on every run, as regression cases.
REGRESSIONS = {
    "fuse-next-to-another-active-set": [("load", "A"), ("load", "B"), ("fuse", "A")],
    "fuse-all-with-two-sets": [("load", "A"), ("load", "B"), ("fuse", None)],
    "enable-all-with-one-fused": [("load", "A"), ("disable", "A"), ("load", "B"), ("fuse", "B"), ("enable", None)],
    "unload-keeps-a-disabled-set-off": [("load", "A"), ("load", "B"), ("disable", "A"), ("unload", "B")],
    "load-next-to-style-keeps-a-disabled-set-off": [("style_load",), ("load", "A"), ("disable", "A"), ("load", "B")],
    "style-delete-keeps-a-disabled-set-off": [("style_load",), ("load", "A"), ("disable", "A"), ("style_delete",)],
    "style-load-switches-the-edits-off": [("load", "A"), ("style_load",)],
    "style-delete-after-style-load": [("load", "A"), ("style_load",), ("style_delete",)],
    "fuse-next-to-an-inactive-lora-name": [("load", "A"), ("style_load",), ("load", "B"), ("fuse", None)],
    "style-load-after-unloading-everything": [
        ("load", "A"),
        ("style_load",),
        ("style_delete",),
        ("unload", None),
        ("style_load",),
    ],
}


def with_regressions(test):
    for ops in REGRESSIONS.values():
        test = example(ops=ops)(test)
    return test


@pytest.mark.parametrize("ops", [pytest.param(ops, id=name) for name, ops in REGRESSIONS.items()])
def test_former_toggle_failure(toggling, ops):
    toggling.run(ops)


@settings(max_examples=50, **FUZZ_SETTINGS)
@given(ops=SEQUENCES)
@with_regressions
def test_random_toggle_sequences_match_the_model(toggling, ops):
    toggling.run(ops)


@pytest.mark.slow
@settings(max_examples=400, **FUZZ_SETTINGS)
@given(ops=SEQUENCES)
@with_regressions
def test_random_toggle_sequences_match_the_model_slow(toggling, ops):
    toggling.run(ops)


def test_the_reference_agrees_with_single_operations(toggling):
    """Sanity check of the harness on sequences that work today: one set at a strength, toggled, unloaded."""
    toggling.run(
        [
            ("load", "A"),
            ("strength", "A", 0.5),
            ("disable", None),
            ("enable", "A"),
            ("fuse", "A"),
            ("strength", "A", 1.0),
            ("unfuse", None),
            ("load", "B"),
            ("unload", "A"),
            ("load", "A"),
            ("unload", None),
            ("style_load",),
            ("load", "B"),
            ("strength", "B", 1.5),
            ("unload", "B"),
            ("style_delete",),
        ]
    )
