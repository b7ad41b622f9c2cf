"""A stand-alone edit run: `python -m tests.edit_job CACHE_DIR OUT_DIR STEPS`, or the same under `accelerate launch`.

Edits `REQUESTS` on the tiny pipeline with the given cache, saves the adapter to OUT_DIR (from the main process),
and prints how many stage-1 optimisations this process ran (the rest came from the cache or from other
processes) as the last line.
"""

from __future__ import annotations

import os
import sys

from accelerate import PartialState

import diffusers_emcid.stage1_cache as stage1_cache_module
from diffusers_emcid import EMCIDConfig, EMCIDEditor
from diffusers_emcid.testing import tiny_sd_pipeline

from .conftest import CAPTIONS

REQUESTS = [
    ("dog", "cat"),
    ("apple", "banana"),
    ("car", "tree"),
    ("house", "circle"),
    ("red", "blue"),
    ("square", "green"),
]


def main() -> None:
    cache_dir, out_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    runs = []
    optimize = stage1_cache_module.optimize_concept_vectors

    def counted(*args, **kwargs):
        runs.extend(request.source for request in args[2])
        return optimize(*args, **kwargs)

    stage1_cache_module.optimize_concept_vectors = counted
    pipe = tiny_sd_pipeline(seed=0)
    # one concept per batch, so that a killed run resumes with batches like the first run's, for a bitwise equal result
    config = EMCIDConfig.from_preset("sd1-paper", num_steps=steps, image_num_inference_steps=2, concept_batch_size=1)
    editor = EMCIDEditor(pipe, config, cache_dir=cache_dir, progress=False)
    editor.compute_statistics(CAPTIONS)
    edits = editor.edit(REQUESTS)
    if PartialState().is_main_process:
        edits.save_pretrained(out_dir)
    # one write(2) of a few bytes to a pipe is atomic, so the lines of two processes cannot interleave
    # (torchrun starts its workers with `python -u`, where print() writes the number and the newline separately)
    os.write(sys.stdout.fileno(), f"{len(runs)}\n".encode())


if __name__ == "__main__":
    main()
