"""Prints the sha256 of every file an edit writes, for fixed tiny pipelines of each family: run it before and after
a refactor that must not change behaviour, on the same machine, and compare.

    OMP_NUM_THREADS=1 python scripts/adapter_digests.py [--out DIR]

One thread makes the float32 arithmetic repeat bit for bit on one machine; other machines (other CPU kernels) may
round differently, so the digests are not golden values to keep in a test.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import torch

from diffusers_emcid import ConceptEdit, EMCIDConfig, EMCIDEditor
from diffusers_emcid.families import pipeline_family
from diffusers_emcid.testing import random_captions, tiny_sd2_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

FAMILIES = {"sd1": tiny_sd_pipeline, "sd2": tiny_sd2_pipeline, "sdxl": tiny_sdxl_pipeline}
REQUESTS = [ConceptEdit("dog", "cat", seed=0), ConceptEdit("van gogh", "monet", seed=1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="keep the written folders here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="emcid-digests-"))
    for name, make_pipe in FAMILIES.items():
        pipe = make_pipe(seed=0)
        config = EMCIDConfig.from_preset(pipeline_family(pipe).default_preset, num_steps=8, image_num_inference_steps=2)
        editor = EMCIDEditor(pipe, config, cache_dir=tempfile.mkdtemp(), progress=False)
        editor.compute_statistics(random_captions())
        folder = editor.edit(REQUESTS).save_pretrained(out / name)
        for file in sorted(folder.iterdir()):
            print(f"{name}/{file.name} {hashlib.sha256(file.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
