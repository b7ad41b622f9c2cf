"""Fuzzing the loader: mutated copies of a valid adapter folder load correctly or are refused cleanly.

A valid folder is built once per module. Each example applies a few mutations to copies of its bytes
(bytes flipped, overwritten, cut or appended; the safetensors header rewritten: shapes, dtypes, offsets,
keys, padding, its length field, the `__metadata__` values with the manifest and the LoRA config; the
companion files corrupted or deleted), writes them into a fresh folder and loads it with
`ConceptEdits.from_pretrained` and `pipe.load_concept_edits`, on one pipeline shared by all examples.

The property: loading either succeeds, and then the text encoder gives the outputs of the valid edits
(when the factors in the file are still the original ones; otherwise finite outputs) and unloading gives
the base outputs back bit for bit; or it raises `ConceptEditsLoadError` with a message and leaves the
pipeline exactly as it was (weights, no PEFT layer or config, no hook). No other exception, no hang.

Key statistics folders (`EMCIDEditor.save_statistics`) go through the same byte, header and layout mutations, and
`EMCIDEditor.load_statistics` either gives the valid statistics bit for bit or refuses them cleanly, taking nothing in.
"""

from __future__ import annotations

import collections
import faulthandler
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load as load_safetensors_bytes

import diffusers_emcid  # noqa: F401  (adds the pipeline methods)
from diffusers_emcid import (
    BaseModelMismatchError,
    ConceptEdits,
    ConceptEditsLoadError,
    EMCIDConfig,
    EMCIDEditor,
    EMCIDFormatError,
)
from diffusers_emcid.serialization import CARD_NAME, MANIFEST_NAME, VECTORS_NAME, WEIGHTS_NAME
from diffusers_emcid.shared_statistics import statistics_file_name
from diffusers_emcid.testing import tiny_sd_pipeline

from .conftest import CAPTIONS, FUZZ_SETTINGS, PROMPTS, encode, hook_counts

FILES = {"weights": WEIGHTS_NAME, "vectors": VECTORS_NAME, "manifest_json": MANIFEST_NAME, "card": CARD_NAME}
EXAMPLE_TIMEOUT_S = 30  # one example takes milliseconds; more than this is a hang
OUTPUT_ATOL = 1e-6

# Placeholders rendered after json.dumps: an integer literal of 5,000 digits (over Python's default limit for
# int parsing) and an array nested 100,000 deep (over the recursion limit of json.loads).
HUGE_INT = "__emcid_fuzz_huge_int__"
DEEP_JSON = "__emcid_fuzz_deep_json__"
HUGE_INT_TEXT = "1" + "0" * 5000
DEEP_JSON_TEXT = "[" * 100_000 + "]" * 100_000

DTYPE_BITS = {
    "F64": 64,
    "F32": 32,
    "F16": 16,
    "BF16": 16,
    "I64": 64,
    "I32": 32,
    "I16": 16,
    "I8": 8,
    "U64": 64,
    "U32": 32,
    "U16": 16,
    "U8": 8,
    "BOOL": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "C64": 64,
}


# ----------------------------------------------------------------------------------------------- the valid folder


@dataclass(repr=False)
class Fuzzing:
    """The valid folder's bytes, the shared pipeline and its reference outputs."""

    files: dict[str, bytes]
    original_tensors: dict[str, torch.Tensor]
    pipe: Any
    ids: torch.Tensor
    base: torch.Tensor
    edited: torch.Tensor
    base_state: dict[str, dict[str, torch.Tensor]]
    workdir: Path
    counts: collections.Counter

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return "<the valid folder and the shared pipeline>"

    def encode(self) -> torch.Tensor:
        with torch.no_grad():
            return self.pipe.text_encoder(self.ids)[0]

    def problems(self) -> list[str]:
        """How the shared pipeline differs from its base state (empty when it is at base)."""
        problems = []
        for name, state in self.base_state.items():
            now = getattr(self.pipe, name).state_dict()
            if now.keys() != state.keys():
                problems.append(f"the module structure of the {name} changed")
            elif not all(torch.equal(now[key], value) for key, value in state.items()):
                problems.append(f"weights of the {name} changed")
            if getattr(getattr(self.pipe, name), "peft_config", None):
                problems.append(f"the {name} has a peft_config")
            if any(isinstance(module, BaseTunerLayer) for module in getattr(self.pipe, name).modules()):
                problems.append(f"the {name} holds PEFT layers")
        if hook_counts(self.pipe):
            problems.append("hooks were left on the pipeline")
        if self.pipe.get_concept_edits():
            problems.append(f"concept edits are still registered: {sorted(self.pipe.get_concept_edits())}")
        return problems

    def reset_if_dirty(self) -> None:
        """Rebuilds the shared pipeline if an earlier (failed) example left it modified, so that one failure
        does not make every later example fail (and hypothesis shrink to the wrong example)."""
        if self.problems():
            self.pipe = tiny_sd_pipeline(seed=0)
            assert not self.problems() and torch.equal(self.encode(), self.base)


def build_fuzzing(workdir: Path) -> Fuzzing:
    pipe = tiny_sd_pipeline(seed=0)
    config = EMCIDConfig.from_preset("sd1-paper", num_steps=8, image_num_inference_steps=2)  # conftest's fast_config
    editor = EMCIDEditor(pipe, config, cache_dir=workdir / "cache", progress=False)
    editor.compute_statistics(CAPTIONS)
    edits = editor.edit([("dog", "cat"), ("apple", "banana")])
    folder = edits.save_pretrained(workdir / "valid")
    files = {key: (folder / name).read_bytes() for key, name in FILES.items()}
    ids = pipe.tokenizer(
        PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    base = encode(pipe, PROMPTS)
    edits.apply(pipe, "reference")
    edited = encode(pipe, PROMPTS)
    edits.remove(pipe, "reference")
    base_state = {
        name: {k: v.detach().clone() for k, v in getattr(pipe, name).state_dict().items()}
        for name in ("text_encoder", "unet", "vae")
    }
    fuzzing = Fuzzing(
        files,
        load_safetensors_bytes(files["weights"]),
        pipe,
        ids,
        base,
        edited,
        base_state,
        workdir,
        collections.Counter(),
    )
    assert not fuzzing.problems() and torch.equal(fuzzing.encode(), base) and not torch.allclose(edited, base)
    return fuzzing


@pytest.fixture(scope="module")
def fuzzing(tmp_path_factory) -> Fuzzing:
    return build_fuzzing(tmp_path_factory.mktemp("fuzz"))


# ----------------------------------------------------------------------------------------------- safetensors bytes


def split_header(data: bytes) -> tuple[dict, bytes]:
    """(header JSON, data section); raises for anything that is not a parseable header."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    if not isinstance(header, dict) or len(data) < 8 + length:
        raise ValueError("not a safetensors header")
    return header, data[8 + length :]


def join_header(header: dict, body: bytes, padding: str = " ", pad: bool = True) -> bytes:
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if pad:
        text += padding.encode() * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def parse_layout(data: bytes) -> tuple[Any, list[list]]:
    """(metadata, [[name, dtype, shape, bytes], ...] in data order)."""
    header, body = split_header(data)
    metadata = header.pop("__metadata__", None)
    tensors = []
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        begin, end = info["data_offsets"]
        tensors.append([name, info["dtype"], list(info["shape"]), body[begin:end]])
    return metadata, tensors


def serialize_layout(metadata: Any, tensors: list[list]) -> bytes:
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    offset, blobs = 0, []
    for name, dtype, shape, blob in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    return join_header(header, b"".join(blobs))


def byte_size(dtype: Any, shape: Any) -> int | None:
    """Bytes of a tensor, or None for shapes that cannot (or should not) be materialised."""
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        return None
    size = math.prod(shape) * DTYPE_BITS.get(dtype if isinstance(dtype, str) else "", 32) // 8
    return size if size <= 1 << 20 else None


def fit(blob: bytes, size: int | None) -> bytes:
    return blob if size is None else blob[:size] + bytes(max(0, size - len(blob)))


# ----------------------------------------------------------------------------------------------- mutations


def render_json(value: Any, ensure_ascii: bool = False) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=ensure_ascii)
    return text.replace(json.dumps(HUGE_INT), HUGE_INT_TEXT).replace(json.dumps(DEEP_JSON), DEEP_JSON_TEXT)


def edit_manifest(manifest: Any, edit: tuple) -> Any:
    kind = edit[0]
    if kind == "replace":
        return edit[1]
    if not isinstance(manifest, dict):
        return manifest
    if kind in ("set", "delete"):
        path = edit[1]
        container: Any = manifest
        for key in path[:-1]:
            if isinstance(container, dict) and key in container:
                container = container[key]
            elif isinstance(container, list) and isinstance(key, int) and key < len(container):
                container = container[key]
            else:
                return manifest
        last = path[-1]
        if isinstance(container, dict) and isinstance(last, str):
            if kind == "set":
                container[last] = edit[2]
            else:
                container.pop(last, None)
        elif isinstance(container, list) and isinstance(last, int) and last < len(container):
            if kind == "set":
                container[last] = edit[2]
            else:
                del container[last]
        return manifest
    concepts = manifest.get("concepts")
    if not isinstance(concepts, list):
        return manifest
    if kind == "append_concept":
        concepts.append(edit[1])
    elif kind == "duplicate_concept" and concepts:
        concepts.append(concepts[edit[1] % len(concepts)])
    elif kind == "drop_concept" and concepts:
        del concepts[edit[1] % len(concepts)]
    return manifest


def replace_layer_index(name: str, new: Any) -> str:
    """`name` with the layer index after `layers.` replaced by `new(index)`."""
    prefix, separator, rest = name.partition("layers.")
    if not separator:
        return name
    index, dot, tail = rest.partition(".")
    return prefix + separator + new(index) + dot + tail


def rename(name: str, how: tuple) -> str:
    kind = how[0]
    if kind == "leading_zero":
        return replace_layer_index(name, lambda index: "0" + index)
    if kind == "unicode_digit":  # the same index in Arabic-Indic digits
        return replace_layer_index(
            name, lambda index: "".join(chr(0x660 + int(c)) if c.isascii() and c.isdigit() else c for c in index)
        )
    if kind == "layer":
        return replace_layer_index(name, lambda index: str(how[1]))
    if kind == "factor_swap":
        return name.replace(".down.", ".\0.").replace(".up.", ".down.").replace(".\0.", ".up.")
    if kind == "component":
        return how[1] + name[name.index(".") :] if "." in name else how[1]
    if kind == "drop_text_model":
        return name.replace("text_model.", "", 1)
    if kind == "suffix":
        return name + how[1]
    if kind == "char":
        position = how[1] % (len(name) + 1)
        return name[:position] + how[2] + name[position + 1 :]
    if kind == "upper":
        return name.upper()
    return how[1]  # "replace"


def mutate_layout(data: bytes, mutation: tuple) -> bytes:
    """The layout-level mutations: the file is re-laid out consistently after the change."""
    metadata, tensors = parse_layout(data)
    kind = mutation[0]
    if kind in ("retype", "reshape", "delete_tensor", "rename") and not tensors:
        return data
    if kind in ("retype", "reshape", "delete_tensor", "rename"):
        tensor = tensors[mutation[2] % len(tensors)]
    if kind == "retype":
        tensor[1] = mutation[3]
        tensor[3] = fit(tensor[3], byte_size(tensor[1], tensor[2]))
    elif kind == "reshape":
        tensor[2] = mutation[3]
        tensor[3] = fit(tensor[3], byte_size(tensor[1], tensor[2]))
    elif kind == "delete_tensor":
        tensors.remove(tensor)
    elif kind == "rename":
        tensor[0] = rename(tensor[0], mutation[3])
    elif kind == "add_tensor":
        _, _, name, dtype, shape = mutation
        tensors.append([name, dtype, shape, bytes(byte_size(dtype, shape) or 0)])
    elif kind == "rank":  # a consistent new rank r for one layer's factors (rows / columns dropped or zero-padded)
        layer, rank = mutation[2] % 4, mutation[3]
        by_name = {t[0]: t for t in tensors}
        prefix = f"text_encoder.text_model.encoder.layers.{layer}.mlp.fc2.lora_linear_layer"
        down, up = by_name.get(f"{prefix}.down.weight"), by_name.get(f"{prefix}.up.weight")
        if down is None or up is None or down[1] != "F32" or up[1] != "F32" or len(down[2]) != 2 or len(up[2]) != 2:
            return data
        try:
            d = torch.frombuffer(bytearray(down[3]), dtype=torch.float32).reshape(down[2])
            u = torch.frombuffer(bytearray(up[3]), dtype=torch.float32).reshape(up[2])
        except (RuntimeError, ValueError):
            return data
        new_d, new_u = torch.zeros(rank, d.shape[1]), torch.zeros(u.shape[0], rank)
        new_d[: min(rank, d.shape[0])] = d[:rank]
        new_u[:, : min(rank, u.shape[1])] = u[:, :rank]
        down[2], down[3] = [rank, d.shape[1]], new_d.numpy().tobytes()
        up[2], up[3] = [u.shape[0], rank], new_u.numpy().tobytes()
    elif kind == "metadata":
        op = mutation[2]
        if op[0] == "none":
            metadata = None
        elif isinstance(metadata, dict):
            if op[0] == "delete":
                metadata.pop(op[1], None)
            else:
                metadata[op[1]] = op[2]
    elif kind == "manifest":
        if not isinstance(metadata, dict) or not isinstance(metadata.get("emcid_manifest"), str):
            return data
        try:
            manifest = json.loads(metadata["emcid_manifest"])
        except ValueError:
            return data
        for edit in mutation[1]:
            manifest = edit_manifest(manifest, edit)
        metadata["emcid_manifest"] = render_json(manifest, ensure_ascii=mutation[2])
    elif kind == "manifest_text":
        if not isinstance(metadata, dict):
            return data
        text = mutation[1]
        if isinstance(text, tuple):  # ("prefix", n): the manifest cut short
            original = metadata.get("emcid_manifest", "")
            text = original[: text[1] % (len(original) + 1)]
        metadata["emcid_manifest"] = DEEP_JSON_TEXT if text == DEEP_JSON else text
    elif kind == "lora_metadata":
        if not isinstance(metadata, dict):
            return data
        if mutation[1] is None:
            metadata.pop("lora_adapter_metadata", None)
        else:
            metadata["lora_adapter_metadata"] = mutation[1]
    return serialize_layout(metadata, tensors)


def mutate_raw_header(data: bytes, mutation: tuple) -> bytes:
    """Header mutations that keep the data section as it is (so offsets and sizes may stop matching)."""
    header, body = split_header(data)
    kind = mutation[0]
    if kind == "raw_padding":
        op = mutation[2]
        if op[0] == "strip":
            return join_header(header, body, pad=False)
        if op[0] == "extra":
            text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b" " * op[1]
            return len(text).to_bytes(8, "little") + text + body
        return join_header(header, body, padding=op[1])
    if kind == "raw_metadata_value":
        header.setdefault("__metadata__", {})
        if isinstance(header["__metadata__"], dict):
            header["__metadata__"][mutation[2]] = mutation[3]
        else:
            header["__metadata__"] = mutation[3]
        return join_header(header, body)
    names = sorted(
        (k for k in header if k != "__metadata__" and isinstance(header[k], dict)),
        key=lambda k: str(header[k].get("data_offsets")),
    )
    if not names:
        return data
    info = header[names[mutation[2] % len(names)]]
    if kind == "raw_shape":
        info["shape"] = mutation[3]
    elif kind == "raw_dtype":
        info["dtype"] = mutation[3]
    elif kind == "raw_offsets":
        op = mutation[3]
        offsets = info.get("data_offsets")
        if op[0] == "swap":
            other = header[names[op[1] % len(names)]]
            info["data_offsets"], other["data_offsets"] = other.get("data_offsets"), offsets
        elif op[0] == "value":
            info["data_offsets"] = list(op[1])
        elif op[0] == "reverse" and isinstance(offsets, list):
            info["data_offsets"] = offsets[::-1]
        elif op[0] == "overlap":  # start where the first tensor starts
            if isinstance(offsets, list) and len(offsets) == 2:
                info["data_offsets"] = [0, offsets[1] - offsets[0]]
        elif op[0] == "shift" and isinstance(offsets, list):
            info["data_offsets"] = [o + op[1] if isinstance(o, int) else o for o in offsets]
    return join_header(header, body)


def mutate_bytes(data: bytes, mutation: tuple) -> bytes:
    kind = mutation[0]
    if kind == "flip":
        buffer = bytearray(data)
        for position, xor in mutation[2]:
            if buffer:
                buffer[position % len(buffer)] ^= xor
        return bytes(buffer)
    if kind == "overwrite":
        position = mutation[2] % (len(data) + 1)
        return data[:position] + mutation[3] + data[position + len(mutation[3]) :]
    if kind == "truncate":
        return data[: mutation[2] % max(len(data), 1)]
    if kind == "append":
        return data + mutation[2]
    if kind == "header_length":
        length = int.from_bytes(data[:8], "little")
        how, value = mutation[2]
        new = (length + value) % 2**64 if how == "delta" else value
        return new.to_bytes(8, "little") + data[8:]
    raise AssertionError(kind)


LAYOUT_KINDS = {
    "retype",
    "reshape",
    "delete_tensor",
    "rename",
    "add_tensor",
    "rank",
    "metadata",
    "manifest",
    "manifest_text",
    "lora_metadata",
}
RAW_KINDS = {"raw_padding", "raw_metadata_value", "raw_shape", "raw_dtype", "raw_offsets"}
WEIGHTS_ONLY = {"rank", "manifest", "manifest_text", "lora_metadata"}


def target_of(mutation: tuple) -> str:
    return "weights" if mutation[0] in WEIGHTS_ONLY else mutation[1]


def kind_of(mutation: tuple) -> str:
    return f"{mutation[0]}:{target_of(mutation)}"


def apply_mutations(files: dict[str, bytes], mutations: list[tuple]) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = dict(files)
    for mutation in mutations:
        target = target_of(mutation)
        data = out[target]
        if data is None:
            continue
        kind = mutation[0]
        if kind == "delete_file":
            out[target] = None
        elif kind == "companion":
            op = mutation[2]
            out[target] = op[1] if op[0] == "replace" else data[: op[1] % (len(data) + 1)]
        elif kind in LAYOUT_KINDS or kind in RAW_KINDS:
            try:
                out[target] = (mutate_layout if kind in LAYOUT_KINDS else mutate_raw_header)(data, mutation)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError, RecursionError):
                pass  # an earlier mutation left no parseable header: this one does nothing
        else:
            out[target] = mutate_bytes(data, mutation)
    return out


# ----------------------------------------------------------------------------------------------- strategies

SAFETENSORS_FILES = st.sampled_from(["weights", "vectors"])
POSITIONS = st.integers(0, 2**16)
SMALL_BYTES = st.binary(min_size=1, max_size=24)
DTYPES = st.sampled_from(sorted(DTYPE_BITS) + ["JUNK", "f32", ""])
ANY_DTYPE = DTYPES | st.sampled_from([None, 4, ["F32"]])
HUGE_SHAPES = [[10**9, 10**9], [2**31, 2**31], [2**32, 2**32], [2**64 - 1, 2], [2**64, 1], [2**61, 2], [2, 2**61]]
SHAPES = st.one_of(
    st.sampled_from(
        HUGE_SHAPES
        + [
            [-1, 64],
            [],
            [0],
            [0, 64],
            [64, 2],
            [1, 128],
            [128],
            [2, 64, 1],
            [2, 32],
            [32, 2],
            [2, 2],
            [1, 64],
            [3, 64],
            [32, 1],
            [32, 3],
            [4, 32],
            [1, 32],
        ]
    ),
    st.lists(st.integers(0, 130), max_size=3),
)
TEXT = st.text(max_size=12) | st.sampled_from(["", " ", "dög → 猫", "\u202e", "\x00", "{}", "Ä" * 40])
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2, 10**30, HUGE_INT, DEEP_JSON]),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=5
)
PLAUSIBLE = st.sampled_from(
    [
        "1",
        1.0,
        2,
        10**30,
        0,
        -1,
        True,
        1.5,
        [1],
        HUGE_INT,
        "diffusers-emcid",
        "peft",
        [0, 1, 2],
        [0, 1, 2, 3, 4],
        [3, 2, 1, 0],
        [0, 0, 1, 2, 3],
        [0, 1, 2, 3.0],
        [True, 1, 2, 3],
        [-1, 0, 1, 2],
        [0, 1, 2, 3, 4000],
        31,
        33,
        63,
        65,
        {"layers": [0, 1, 2, 3], "hidden_size": 32, "intermediate_size": 64},
        [],
        {},
        "0:-1",
        "memit",
        0.6,
        1.0,
        "float16",
    ]
)
MANIFEST_PATHS = st.sampled_from(
    [
        ("format",),
        ("format_version",),
        ("library_version",),
        ("base_model",),
        ("concepts",),
        ("concepts", 0),
        ("concepts", 0, "source"),
        ("concepts", 1, "destination"),
        ("concepts", 0, "templates"),
        ("concepts", 1, "templates", 0),
        ("concepts", 0, "seed"),
        ("concepts", 1, "text_alignment"),
        ("concepts", 0, "num_images"),
        ("config",),
        ("config", "layers"),
        ("config", "num_steps"),
        ("config", "edit_weight"),
        ("config", "residual"),
        ("config", "dtype"),
        ("config", "preset"),
        ("config", "new_field"),
        ("z_layer",),
        ("z_layers",),
        ("z_layers", "text_encoder"),
        ("z_layers", "text_encoder_2"),
        ("concepts", 0, "use_real_noise"),
        ("components",),
        ("components", "text_encoder"),
        ("components", "text_encoder", "layers"),
        ("components", "text_encoder", "layers", 0),
        ("components", "text_encoder", "hidden_size"),
        ("components", "text_encoder", "intermediate_size"),
        ("components", "text_encoder", "base_fingerprint"),
        ("components", "text_encoder_2"),
        ("components", "unet"),
        ("storage_dtype",),
        ("storage_max_abs_error",),
        ("extra_field",),
    ]
)
CONCEPTS = st.fixed_dictionaries(
    {
        "source": TEXT | st.just("dög"),
        "destination": TEXT,
        "seed": st.integers(-5, 2**64) | st.booleans(),
        "templates": st.lists(TEXT | st.just("a photo of {}"), max_size=2),
        "num_images": st.just(0),
    }
)
MANIFEST_EDITS = st.one_of(
    st.tuples(st.just("set"), MANIFEST_PATHS, JSON_VALUES | PLAUSIBLE),
    st.tuples(st.just("delete"), MANIFEST_PATHS),
    st.tuples(st.just("append_concept"), CONCEPTS),
    st.tuples(st.just("duplicate_concept"), st.integers(0, 3)),
    st.tuples(st.just("drop_concept"), st.integers(0, 3)),
    st.tuples(st.just("replace"), JSON_VALUES),
)
RENAMES = st.one_of(
    st.sampled_from([("leading_zero",), ("unicode_digit",), ("factor_swap",), ("drop_text_model",), ("upper",)]),
    st.tuples(st.just("layer"), st.sampled_from([0, 1, 3, 4, 5, 9999, "x", "-1", "1 ", "01"])),
    st.tuples(st.just("component"), st.sampled_from(["text_encoder_2", "unet", "te", "text_encoder ", "Text_encoder"])),
    st.tuples(st.just("suffix"), st.sampled_from(["\n", " ", ".weight", "x", "\x00"])),
    st.tuples(st.just("char"), st.integers(0, 100), st.characters()),
    st.tuples(st.just("replace"), TEXT | st.sampled_from(["__metadata__", "text_encoder"])),
)
METADATA_OPS = st.one_of(
    st.tuples(
        st.just("delete"),
        st.sampled_from(["emcid_companion_digest", "format", "emcid_manifest", "lora_adapter_metadata"]),
    ),
    st.tuples(st.just("set"), st.sampled_from(["emcid_companion_digest", "format", "new_key", ""]), TEXT),
    st.just(("none",)),
)
OFFSET_OPS = st.one_of(
    st.tuples(st.just("swap"), st.integers(0, 8)),
    st.tuples(
        st.just("value"),
        st.tuples(
            st.integers(-10, 2**13) | st.sampled_from([2**63, 2**64 - 1, 2**64, 1.5]),
            st.integers(-10, 2**13) | st.sampled_from([2**63, 2**64 - 1, 2**64]),
        ),
    ),
    st.just(("reverse",)),
    st.just(("overlap",)),
    st.tuples(st.just("shift"), st.integers(-64, 64).filter(bool)),
)
INDEX = st.integers(0, 15)


def byte_mutations(files: st.SearchStrategy[str]) -> st.SearchStrategy[tuple]:
    """Bytes of one of `files` flipped, overwritten, cut off or appended, or its header length field rewritten."""
    return st.one_of(
        st.tuples(
            st.just("flip"),
            files,
            st.lists(st.tuples(POSITIONS, st.integers(1, 255)), min_size=1, max_size=4).map(tuple),
        ),
        st.tuples(st.just("overwrite"), files, POSITIONS, SMALL_BYTES),
        st.tuples(st.just("truncate"), files, POSITIONS),
        st.tuples(st.just("append"), files, SMALL_BYTES),
        st.tuples(
            st.just("header_length"),
            files,
            st.tuples(st.just("delta"), st.integers(-64, 64).filter(bool))
            | st.tuples(st.just("value"), st.sampled_from([0, 1, 7, 8, 2**31, 2**32, 2**63, 2**64 - 1])),
        ),
    )


def raw_header_mutations(files: st.SearchStrategy[str], metadata_keys: list[str]) -> st.SearchStrategy[tuple]:
    """Header entries of one of `files` rewritten in place (shapes, dtypes, offsets, padding, a metadata value of
    another JSON type), the data section left as it is."""
    return st.one_of(
        st.tuples(st.just("raw_shape"), files, INDEX, SHAPES),
        st.tuples(st.just("raw_dtype"), files, INDEX, ANY_DTYPE),
        st.tuples(st.just("raw_offsets"), files, INDEX, OFFSET_OPS),
        st.tuples(
            st.just("raw_padding"),
            files,
            st.just(("strip",))
            | st.tuples(st.just("extra"), st.integers(1, 9))
            | st.tuples(st.just("char"), st.sampled_from(["\x00", "\n", "x", "\t"])),
        ),
        st.tuples(
            st.just("raw_metadata_value"),
            files,
            st.sampled_from(metadata_keys),
            st.sampled_from([1, None, [], {}, True, 1.5]),
        ),
    )


def tensor_mutations(files: st.SearchStrategy[str], added_names: st.SearchStrategy[str]) -> st.SearchStrategy[tuple]:
    """A tensor of one of `files` retyped, reshaped, deleted or renamed, or one added, the file laid out anew."""
    return st.one_of(
        st.tuples(st.just("retype"), files, INDEX, ANY_DTYPE),
        st.tuples(st.just("reshape"), files, INDEX, SHAPES),
        st.tuples(st.just("delete_tensor"), files, INDEX),
        st.tuples(st.just("rename"), files, INDEX, RENAMES),
        st.tuples(st.just("add_tensor"), files, added_names, DTYPES, SHAPES),
    )


BYTE_MUTATIONS = byte_mutations(SAFETENSORS_FILES)
RAW_HEADER_MUTATIONS = raw_header_mutations(SAFETENSORS_FILES, ["format", "emcid_manifest", "x"])
LAYOUT_MUTATIONS = st.one_of(
    tensor_mutations(
        SAFETENSORS_FILES,
        st.sampled_from(
            [
                "text_encoder.text_model.encoder.layers.4.mlp.fc2.lora_linear_layer.down.weight",
                "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight",
                "text_encoder_2.text_model.encoder.layers.0.mlp.fc2.lora_linear_layer.up.weight",
                "text_encoder",
                "text_encoder_2",
                "unet.x",
                "",
            ]
        )
        | TEXT,
    ),
    st.tuples(st.just("rank"), st.just("weights"), INDEX, st.integers(0, 4)),
    st.tuples(st.just("metadata"), SAFETENSORS_FILES, METADATA_OPS),
)
MANIFEST_MUTATIONS = st.one_of(
    st.tuples(st.just("manifest"), st.lists(MANIFEST_EDITS, min_size=1, max_size=3).map(tuple), st.booleans()),
    st.tuples(
        st.just("manifest_text"),
        st.sampled_from(
            [
                "",
                "null",
                "[]",
                "{}",
                "{not json",
                '"text"',
                "1e999",
                DEEP_JSON,
                '{"format": "diffusers-emcid", "format_version": 1}',
            ]
        )
        | TEXT
        | st.tuples(st.just("prefix"), st.integers(0, 2000)),
    ),
    st.tuples(st.just("lora_metadata"), st.none() | TEXT | JSON_VALUES.map(render_json)),
)
COMPANION_MUTATIONS = st.one_of(
    st.tuples(
        st.just("companion"),
        st.sampled_from(["manifest_json", "card"]),
        st.tuples(st.just("replace"), st.binary(max_size=32)) | st.tuples(st.just("truncate"), POSITIONS),
    ),
    st.tuples(st.just("delete_file"), st.sampled_from(["manifest_json", "card", "vectors"])),
)
MUTATIONS = st.lists(
    st.one_of(BYTE_MUTATIONS, RAW_HEADER_MUTATIONS, LAYOUT_MUTATIONS, MANIFEST_MUTATIONS, COMPANION_MUTATIONS),
    min_size=1,
    max_size=3,
)

# Minimal examples that this fuzz test found raising other exceptions than ConceptEditsLoadError, before the
# loader was fixed; they run first on every run, as regression cases.
REGRESSIONS = [
    ("key-layer-01", [("rename", "weights", 2, ("leading_zero",))]),
    ("key-layer-arabic-indic-digit", [("rename", "weights", 2, ("unicode_digit",))]),
    ("key-trailing-newline", [("rename", "weights", 2, ("suffix", "\n"))]),
    ("manifest-nested-100000-deep", [("manifest_text", DEEP_JSON)]),
    ("manifest-5000-digit-int", [("manifest", (("set", ("format_version",), HUGE_INT),), False)]),
    ("vectors-F8_E4M3", [("retype", "vectors", 0, "F8_E4M3")]),
    ("vectors-F4", [("retype", "vectors", 0, "F4")]),
]


# ----------------------------------------------------------------------------------------------- the property


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expire(signum, frame):
        raise TimeoutError(f"loading took more than {seconds} s (a hang?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def original_factors(fuzzing: Fuzzing, weights: bytes | None) -> bool:
    """Whether the weights file still holds exactly the original factors (names, dtype and values)."""
    if weights is None:
        return False
    try:
        tensors = load_safetensors_bytes(weights)
    except Exception:
        return False
    original = fuzzing.original_tensors
    return tensors.keys() == original.keys() and all(
        tensors[k].dtype == v.dtype and tensors[k].shape == v.shape and torch.equal(tensors[k], v)
        for k, v in original.items()
    )


def largest_factor_entry(weights: bytes) -> float:
    tensors = load_safetensors_bytes(weights)
    return max((t.double().abs().max().item() for t in tensors.values() if t.numel()), default=0.0)


def check_example(fuzzing: Fuzzing, mutations: list[tuple]) -> str:
    """Runs the property on one mutated folder; returns the outcome ('loaded', 'loaded_changed' or the error class)."""
    fuzzing.reset_if_dirty()
    files = apply_mutations(fuzzing.files, mutations)
    folder = Path(tempfile.mkdtemp(dir=fuzzing.workdir, prefix="mutant-"))
    try:
        for key, data in files.items():
            if data is not None:
                (folder / FILES[key]).write_bytes(data)
        with time_limit(EXAMPLE_TIMEOUT_S):
            outcome = load_and_check(fuzzing, folder, files)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for mutation in mutations:
        fuzzing.counts[kind_of(mutation), outcome] += 1
    fuzzing.counts["examples", outcome] += 1
    return outcome


def load_and_check(fuzzing: Fuzzing, folder: Path, files: dict[str, bytes | None]) -> str:
    try:
        read_error = None
        ConceptEdits.from_pretrained(folder)
    except ConceptEditsLoadError as error:
        assert str(error).strip(), "empty error message"
        assert isinstance(error, EMCIDFormatError), f"from_pretrained raised {error!r}, not EMCIDFormatError"
        read_error = error

    pipe = fuzzing.pipe
    try:
        name = pipe.load_concept_edits(folder, adapter_name="fuzz")
    except ConceptEditsLoadError as error:
        assert str(error).strip(), "empty error message"
        problems = fuzzing.problems()
        assert not problems, f"after {type(error).__name__}({error}) the pipeline is not as before: {problems}"
        assert torch.equal(fuzzing.encode(), fuzzing.base)
        if read_error is None:  # the files are fine, so only the fit to the pipeline can fail
            assert isinstance(error, BaseModelMismatchError), (
                f"from_pretrained loaded it but load_concept_edits raised {error!r}"
            )
        else:  # (the messages may differ: safetensors names whichever bad tensor it meets first, in hash order)
            assert type(error) is type(read_error), (
                f"from_pretrained raised {read_error!r} but load_concept_edits {error!r}"
            )
        return type(error).__name__

    assert read_error is None, f"load_concept_edits loaded what from_pretrained refused ({read_error!r})"
    assert name == "fuzz" and list(pipe.get_concept_edits()) == ["fuzz"]
    output = fuzzing.encode()
    if original_factors(fuzzing, files["weights"]):
        outcome = "loaded"
        difference = (output - fuzzing.edited).abs().max().item()
        assert difference <= OUTPUT_ATOL, (
            f"the loaded edits give other outputs than the valid ones (max abs diff {difference})"
        )
    else:
        outcome = "loaded_changed"
        # A factor that a mutation made finite but enormous (a flipped exponent bit) legitimately overflows float32
        # in the forward pass; below 1e6 every output must be finite.
        if largest_factor_entry(files["weights"]) <= 1e6:
            assert torch.isfinite(output).all(), "loaded edits with moderate factors give non-finite outputs"
        else:
            outcome = "loaded_changed_huge"
    pipe.unload_concept_edits(name)
    problems = fuzzing.problems()
    assert not problems, f"unload_concept_edits() did not restore the pipeline: {problems}"
    assert torch.equal(fuzzing.encode(), fuzzing.base), (
        "unload_concept_edits() did not give the base outputs back bitwise"
    )
    return outcome


def print_counts(fuzzing: Fuzzing, title: str, seconds: float) -> None:
    totals = {k[1]: v for k, v in fuzzing.counts.items() if k[0] == "examples"}
    print(f"\n{title}: {sum(totals.values())} examples in {seconds:.1f} s; outcomes {dict(sorted(totals.items()))}")
    kinds = sorted({k[0] for k in fuzzing.counts if k[0] != "examples"})
    outcomes = sorted({k[1] for k in fuzzing.counts})
    print(f"{'mutation kind':32}" + "".join(f"{o:>22}" for o in outcomes))
    for kind in kinds:
        print(f"{kind:32}" + "".join(f"{fuzzing.counts[kind, o]:>22}" for o in outcomes))


def with_regressions(test):
    for _, mutations in REGRESSIONS:
        test = example(mutations=mutations)(test)
    return test


@settings(max_examples=300, **FUZZ_SETTINGS)
@given(mutations=MUTATIONS)
@with_regressions
def test_mutated_folders_load_correctly_or_are_refused_cleanly(fuzzing, mutations):
    check_example(fuzzing, mutations)


@pytest.mark.slow
@settings(max_examples=10_000, **FUZZ_SETTINGS)
@given(mutations=MUTATIONS)
@with_regressions
def test_mutated_folders_slow(slow_fuzzing, mutations):
    check_example(slow_fuzzing, mutations)


@pytest.fixture(scope="module")
def slow_fuzzing(fuzzing):
    """The shared fuzzing state, with a hard time budget for the whole slow run and a count table printed after it
    (with `-s`)."""
    fuzzing.counts.clear()
    start = time.monotonic()
    faulthandler.dump_traceback_later(20 * 60, exit=True)  # a hang inside C code cannot be interrupted by SIGALRM
    try:
        yield fuzzing
    finally:
        faulthandler.cancel_dump_traceback_later()
        print_counts(fuzzing, "slow loading fuzz", time.monotonic() - start)


# ------------------------------------------------------------------------------------------ former bugs, one by one


@pytest.mark.parametrize("mutations", [pytest.param(mutations, id=name) for name, mutations in REGRESSIONS])
def test_former_failure_is_refused_cleanly(fuzzing, mutations):
    fuzzing.reset_if_dirty()
    files = apply_mutations(fuzzing.files, mutations)
    folder = Path(tempfile.mkdtemp(dir=fuzzing.workdir, prefix="known-"))
    for key, data in files.items():
        if data is not None:
            (folder / FILES[key]).write_bytes(data)
    with pytest.raises(ConceptEditsLoadError):
        ConceptEdits.from_pretrained(folder)
    with pytest.raises(ConceptEditsLoadError):
        fuzzing.pipe.load_concept_edits(folder, adapter_name="fuzz")
    assert not fuzzing.problems()


def test_the_mutations_keep_a_valid_folder_valid_when_they_change_nothing(fuzzing):
    """The re-serialisation used by the header mutations gives back the valid file, and the valid folder loads."""
    metadata, tensors = parse_layout(fuzzing.files["weights"])
    assert serialize_layout(metadata, tensors) == fuzzing.files["weights"]
    header, body = split_header(fuzzing.files["vectors"])
    assert join_header(header, body) == fuzzing.files["vectors"]
    assert check_example(fuzzing, [("companion", "card", ("truncate", 10))]) == "loaded"


# ----------------------------------------------------------------------------------------------- huge declared tensors

CHILD = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, 2 * 1024**3))  # a huge allocation fails instead of passing
import diffusers_emcid
from diffusers_emcid import ConceptEdits, ConceptEditsLoadError
from diffusers_emcid.testing import tiny_sd_pipeline

pipe = tiny_sd_pipeline(seed=0)
for folder in sys.argv[1:]:
    for load in (ConceptEdits.from_pretrained, pipe.load_concept_edits):
        try:
            load(folder)
        except ConceptEditsLoadError as error:
            print("REFUSED", folder, type(error).__name__, " ".join(str(error).split()))
        else:
            print("LOADED", folder)
            sys.exit(3)
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

HUGE_DECLARATIONS = {  # name: (file, declared F32 shape of its first tensor, intermediate_size written in the manifest)
    "weights-2^31x2^31": ("weights", [2**31, 2**31], None),
    "weights-2x2^61-manifest-agrees": ("weights", [2, 2**61], 2**61),
    "weights-2x2^40-manifest-agrees": ("weights", [2, 2**40], 2**40),
    "vectors-2^31x2^31": ("vectors", [2**31, 2**31], None),
    "vectors-2^20x2^20": ("vectors", [2**20, 2**20], None),
}


def huge_header(data: bytes, shape: list[int], manifest_size: int | None) -> bytes:
    """The file with its first tensor declared as `shape` F32 (offsets unchanged, so they fit the file)."""
    header, body = split_header(data)
    name = sorted(k for k in header if k != "__metadata__")[0]
    header[name]["shape"], header[name]["dtype"] = shape, "F32"
    if manifest_size is not None:  # make the manifest agree with the declared size
        manifest = json.loads(header["__metadata__"]["emcid_manifest"])
        manifest["components"]["text_encoder"]["intermediate_size"] = manifest_size
        header["__metadata__"]["emcid_manifest"] = json.dumps(manifest)
    return join_header(header, body)


def test_a_huge_declared_tensor_is_refused_without_allocating_it(fuzzing, tmp_path):
    """Run in a child process whose address space is limited to 2 GiB, so that an attempt to allocate the
    declared tensor fails there (and shows in the message or the peak memory) instead of passing unnoticed."""
    folders = []
    for name, (target, shape, manifest_size) in HUGE_DECLARATIONS.items():
        files = dict(fuzzing.files)
        files[target] = huge_header(files[target], shape, manifest_size)
        folders.append(tmp_path / name)
        folders[-1].mkdir()
        for key, data in files.items():
            (folders[-1] / FILES[key]).write_bytes(data)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, folders)], capture_output=True, text=True, timeout=300, env=env
    )
    assert child.returncode == 0, f"the child failed ({child.returncode}):\n{child.stdout}\n{child.stderr[-3000:]}"
    refused = [line for line in child.stdout.splitlines() if line.startswith("REFUSED")]
    assert len(refused) == 2 * len(folders), child.stdout
    for folder in folders:
        assert sum(line.startswith(f"REFUSED {folder} ") for line in refused) == 2, child.stdout
    assert not any("alloc" in line.lower() or "memory" in line.lower() for line in refused), (
        f"the loader tried to allocate a declared tensor:\n{child.stdout}"
    )
    max_rss_kb = int(child.stdout.split("MAXRSS_KB")[1].split()[0])
    assert max_rss_kb < 1024**2, f"the child used {max_rss_kb} kB"


# ----------------------------------------------------------------------------------------------- key statistics files

STATISTICS_NAMES = [statistics_file_name("text_encoder", layer) for layer in range(4)]
STATISTICS_FILES = st.sampled_from(STATISTICS_NAMES)
STATISTICS_METADATA_KEYS = [
    "format",
    "emcid_format",
    "emcid_format_version",
    "library_version",
    "component",
    "layer",
    "model_fingerprint",
    "model_dtype",
    "caption_set",
    "num_captions",
    "num_tokens",
    "statistics_positions",
    "statistics_padding_weight",
    "emcid_digest",
    "base_model",
]
STATISTICS_VALUES = TEXT | st.sampled_from(
    [
        "1",
        "2",
        "0",
        "-1",
        "64",
        "1e999",
        "nan",
        "1.0",
        "0.5",
        "paper",
        "pipeline",
        "float16",
        "text_encoder_2",
        "emcid-key-statistics",
        "0" * 64,
    ]
)
STATISTICS_MUTATIONS = st.lists(
    st.one_of(
        byte_mutations(STATISTICS_FILES),
        raw_header_mutations(STATISTICS_FILES, STATISTICS_METADATA_KEYS + ["x"]),
        tensor_mutations(STATISTICS_FILES, st.sampled_from(["covariance", "covariance ", "mom2", ""]) | TEXT),
        st.tuples(
            st.just("metadata"),
            STATISTICS_FILES,
            st.tuples(st.just("delete"), st.sampled_from(STATISTICS_METADATA_KEYS))
            | st.tuples(st.just("set"), st.sampled_from([*STATISTICS_METADATA_KEYS, "new_key"]), STATISTICS_VALUES)
            | st.just(("none",)),
        ),
        st.tuples(
            st.just("companion"),
            st.just("README.md"),
            st.tuples(st.just("replace"), st.binary(max_size=32)) | st.tuples(st.just("truncate"), POSITIONS),
        ),
        st.tuples(st.just("delete_file"), st.sampled_from(STATISTICS_NAMES + ["README.md"])),
    ),
    min_size=1,
    max_size=3,
)


@dataclass(repr=False)
class StatisticsFuzzing:
    """The valid statistics folder's bytes (`{file name: bytes}`), what it holds, and the pipeline it fits."""

    files: dict[str, bytes]
    covariances: dict[int, torch.Tensor]
    num_tokens: int
    fuzzing: Fuzzing
    config: EMCIDConfig
    counts: collections.Counter

    def __repr__(self) -> str:
        return "<the valid statistics folder>"


@pytest.fixture(scope="module")
def statistics_fuzzing(fuzzing) -> StatisticsFuzzing:
    config = EMCIDConfig.from_preset("sd1-paper", num_steps=8, image_num_inference_steps=2)
    editor = EMCIDEditor(fuzzing.pipe, config, cache_dir=fuzzing.workdir / "cache", progress=False)
    editor.compute_statistics(CAPTIONS)  # from the cache `build_fuzzing` filled
    folder = editor.save_statistics(fuzzing.workdir / "statistics")
    files = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert sorted(files) == ["README.md", *STATISTICS_NAMES]
    statistics = editor.statistics.known["text_encoder"]
    return StatisticsFuzzing(
        files, statistics.covariances, statistics.num_tokens, fuzzing, config, collections.Counter()
    )


def check_statistics_example(statistics_fuzzing: StatisticsFuzzing, mutations: list[tuple]) -> str:
    """`load_statistics` of a mutated folder either gives the valid statistics bit for bit, or raises a clear
    `EMCIDFormatError`, `BaseModelMismatchError` or (other settings) `ValueError` and takes nothing in: no
    statistics in memory or in the cache. Returns the outcome."""
    files = apply_mutations(statistics_fuzzing.files, mutations)
    workdir = Path(tempfile.mkdtemp(dir=statistics_fuzzing.fuzzing.workdir, prefix="statistics-mutant-"))
    try:
        folder = workdir / "statistics"
        folder.mkdir()
        for name, data in files.items():
            if data is not None:
                (folder / name).write_bytes(data)
        editor = EMCIDEditor(
            statistics_fuzzing.fuzzing.pipe, statistics_fuzzing.config, cache_dir=workdir / "cache", progress=False
        )
        with time_limit(EXAMPLE_TIMEOUT_S):
            try:
                loaded = editor.load_statistics(folder)
            except ValueError as error:
                assert str(error).strip(), "empty error message"
                assert isinstance(error, (EMCIDFormatError, BaseModelMismatchError)) or (
                    type(error) is ValueError and "statistics_positions" in str(error)
                ), f"unexpected {error!r}"
                assert not editor.statistics.known and not list((workdir / "cache").rglob("*.safetensors")), (
                    f"refused statistics ({error}) were taken in"
                )
                outcome = type(error).__name__
            else:
                valid = statistics_fuzzing.covariances
                assert loaded["text_encoder"].keys() == valid.keys()
                assert all(torch.equal(loaded["text_encoder"][layer], valid[layer]) for layer in valid), (
                    "loaded statistics differ from the valid ones"
                )
                assert editor.statistics.known["text_encoder"].num_tokens == statistics_fuzzing.num_tokens
                outcome = "loaded"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for mutation in mutations:
        statistics_fuzzing.counts[kind_of(mutation), outcome] += 1
    return outcome


@settings(max_examples=200, **FUZZ_SETTINGS)
@given(mutations=STATISTICS_MUTATIONS)
def test_mutated_statistics_load_unchanged_or_are_refused_cleanly(statistics_fuzzing, mutations):
    check_statistics_example(statistics_fuzzing, mutations)


@pytest.mark.slow
@settings(max_examples=5_000, **FUZZ_SETTINGS)
@given(mutations=STATISTICS_MUTATIONS)
def test_mutated_statistics_slow(statistics_fuzzing, mutations):
    check_statistics_example(statistics_fuzzing, mutations)


def test_the_statistics_mutations_keep_a_valid_folder_valid_when_they_change_nothing(statistics_fuzzing):
    data = statistics_fuzzing.files[STATISTICS_NAMES[0]]
    assert serialize_layout(*parse_layout(data)) == data
    assert check_statistics_example(statistics_fuzzing, [("companion", "README.md", ("truncate", 10))]) == "loaded"
    assert check_statistics_example(statistics_fuzzing, [("flip", STATISTICS_NAMES[1], ((-1, 1),))]) == (
        "EMCIDFormatError"
    )
