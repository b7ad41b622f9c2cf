"""Interrupted and concurrent runs, numerical faults, determinism, hostile names, and secrets."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from diffusers_emcid import ConceptEdit, ConceptEdits, EMCIDConfig, EMCIDEditor, EMCIDNumericalError, LowRankDelta
from diffusers_emcid.serialization import CARD_NAME, MANIFEST_NAME, VECTORS_NAME, WEIGHTS_NAME

from .conftest import assert_pipeline_unchanged, counted_calls, model_state

ROOT = Path(__file__).resolve().parents[1]
ADAPTER_FILES = (WEIGHTS_NAME, VECTORS_NAME, MANIFEST_NAME, CARD_NAME)


def run_job(cache_dir, out_dir, steps=30):
    return subprocess.Popen(
        [sys.executable, "-m", "tests.edit_job", str(cache_dir), str(out_dir), str(steps)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return int(out.strip().splitlines()[-1])


def same_files(a: Path, b: Path) -> bool:
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in ADAPTER_FILES)


@pytest.mark.slow
def test_a_killed_run_resumes_and_gives_the_same_adapter_bitwise(tmp_path):
    assert finish(run_job(tmp_path / "cache-a", tmp_path / "a")) == 6

    process = run_job(tmp_path / "cache-b", tmp_path / "b")
    stage1 = tmp_path / "cache-b" / "stage1"
    deadline = time.monotonic() + 240
    while len(list(stage1.glob("*.safetensors"))) < 2:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "stage 1 never got going"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list(stage1.glob("*.safetensors")))
    assert 2 <= done < 6, f"the kill came too late ({done} of 6 concepts done)"
    assert not (tmp_path / "b").exists()

    assert finish(run_job(tmp_path / "cache-b", tmp_path / "b")) == 6 - done
    assert same_files(tmp_path / "a", tmp_path / "b")


@pytest.mark.slow
def test_two_processes_share_a_cache_without_corrupting_it(tmp_path):
    first, second = run_job(tmp_path / "cache", tmp_path / "a"), run_job(tmp_path / "cache", tmp_path / "b")
    finish(first), finish(second)
    assert same_files(tmp_path / "a", tmp_path / "b")
    entries = list((tmp_path / "cache" / "stage1").glob("*"))
    assert len(entries) == 6 and all(p.suffix == ".safetensors" for p in entries), "temporary files were left behind"
    assert finish(run_job(tmp_path / "cache", tmp_path / "c")) == 0


def test_request_order_does_not_change_the_adapter(editor, tmp_path):
    forward = editor.edit([("dog", "cat"), ("apple", "banana"), ConceptEdit("car", "tree", templates=["a {}"])])
    backward = editor.edit([ConceptEdit("car", "tree", templates=["a {}"]), ("apple", "banana"), ("dog", "cat")])
    assert same_files(forward.save_pretrained(tmp_path / "f"), backward.save_pretrained(tmp_path / "b"))


def test_rank_deficient_statistics_are_refused_before_stage_1(pipe, fast_config, tmp_path, caplog):
    fast_config.statistics_positions = "paper"  # 2 captions: 6 tokens (with the padding, 231 positions)
    editor = EMCIDEditor(pipe, fast_config, cache_dir=tmp_path, progress=False)
    with caplog.at_level(logging.WARNING):
        editor.compute_statistics(["a dog", "a cat"])
    assert "rank-deficient" in caplog.text and "more captions" in caplog.text
    with counted_calls(pipe.unet) as calls:
        with pytest.raises(EMCIDNumericalError, match="fewer than the 64 key dimensions.*more captions"):
            editor.edit([("dog", "cat")])
    assert not calls


def test_a_diverging_concept_is_reported_and_the_others_are_kept(editor, pipe, monkeypatch):
    import diffusers_emcid.stage1_cache as stage1_cache_module

    optimize = stage1_cache_module.optimize_concept_vectors

    def poison(module, args, output):  # the UNet's rows of 'apple' (sorted first, 3 prompts) in the stage-1 steps
        sample = output[0] if isinstance(output, tuple) else output.sample
        if sample.shape[0] != 6:  # image generation and later steps
            return output
        poisoned = torch.cat([sample[:3] * float("nan"), sample[3:]])
        return (poisoned, *output[1:]) if isinstance(output, tuple) else output.__class__(sample=poisoned)

    state = model_state(pipe)
    handle = pipe.unet.register_forward_hook(poison)
    try:
        with pytest.raises(
            EMCIDNumericalError, match=r"(?s)1 of 2 concepts.*'apple' -> 'banana'.*step 0.*Lower learning_rate"
        ):
            editor.edit([("apple", "banana"), ("dog", "cat")])
    finally:
        handle.remove()
    assert_pipeline_unchanged(pipe, state)
    stage1 = list((editor.cache.root / "stage1").glob("*.safetensors"))
    assert len(stage1) == 1, "the healthy concept should be cached, the diverged one not"
    runs = []
    monkeypatch.setattr(
        stage1_cache_module,
        "optimize_concept_vectors",
        lambda *a, **k: runs.extend(r.source for r in a[2]) or optimize(*a, **k),
    )
    edits = editor.edit([("apple", "banana"), ("dog", "cat")])
    assert runs == ["apple"]
    assert all(torch.isfinite(d.dense()).all() for d in edits.deltas["text_encoder"].values())


def test_a_concept_held_by_the_clamp_at_every_step_is_reported(editor, caplog):
    editor.config.learning_rate, editor.config.clamp_norm_factor = 50.0, 0.01
    with caplog.at_level(logging.WARNING):
        editor.edit([("dog", "cat")])
    assert (
        "'dog' -> 'cat'" in caplog.text
        and "every one of 8 steps" in caplog.text
        and "Lower learning_rate" in caplog.text
    )


def test_nothing_non_finite_is_written(editor, tmp_path):
    edits = editor.edit([("dog", "cat")])
    layer = next(iter(edits.deltas["text_encoder"]))
    delta = edits.deltas["text_encoder"][layer]
    edits.deltas["text_encoder"][layer] = LowRankDelta(delta.up * float("inf"), delta.down)
    with pytest.raises(EMCIDNumericalError, match="NaN or inf"):
        edits.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


HOSTILE_NAMES = [
    "dog\nbase_model: evil/model",
    "---\nlibrary_name: pickle\n---",
    "<script>alert('x')</script> | pipe | `code`",
    "# heading *bold* [link](http://example.com)",
    "ünïcödé 猫 кошка 🐱",
    "x" * 5000,
    "quote\" and 'single' and \\backslash",
]


def test_hostile_concept_names_round_trip_and_cannot_touch_the_card_metadata(tmp_path):
    config = EMCIDConfig()
    requests = [ConceptEdit(name, f"dest {i}", templates=["{}"]) for i, name in enumerate(HOSTILE_NAMES)]
    generator = torch.Generator().manual_seed(0)
    n = len(requests)
    deltas = {
        "text_encoder": {
            0: LowRankDelta(torch.randn(32, n, generator=generator), torch.randn(n, 64, generator=generator))
        }
    }
    edits = ConceptEdits(
        requests,
        {"text_encoder": torch.randn(n, 32, generator=generator)},
        deltas,
        config,
        {"text_encoder": 0},
        base_model="org/model",
    )
    folder = edits.save_pretrained(tmp_path / "hostile")
    loaded = ConceptEdits.from_pretrained(folder)
    assert loaded.concepts == edits.concepts
    card = (folder / CARD_NAME).read_text(encoding="utf-8")
    assert card.startswith("---\n")
    header, body = card[4:].split("\n---\n", 1)
    metadata = yaml.safe_load(header)
    assert metadata["base_model"] == "org/model" and metadata["library_name"] == "diffusers"
    assert set(metadata) == {"base_model", "base_model_relation", "library_name", "pipeline_tag", "tags"}
    assert "<script>" not in body and "&lt;script&gt;" in body
    for name in HOSTILE_NAMES:
        assert "\n" not in name or name.split("\n")[1] not in header


def test_tokens_never_appear_in_files_logs_or_errors(editor, hub, tmp_path, caplog):
    from huggingface_hub.errors import HfHubHTTPError

    edits = editor.edit([("dog", "cat")])
    with caplog.at_level(logging.DEBUG):
        edits.push_to_hub("carol/secret", private=True, token=hub.token)
        secret = "hf_NotARealTokenButSecret123"
        with pytest.raises(HfHubHTTPError) as failure:
            edits.push_to_hub("carol/other", token=secret)
    assert secret not in str(failure.value) and secret not in caplog.text and hub.token not in caplog.text
    folder = ConceptEdits.from_pretrained("carol/secret", token=hub.token, cache_dir=tmp_path / "c")
    assert len(folder) == 1
    snapshot = next((tmp_path / "c").rglob(MANIFEST_NAME)).parent
    for name in (MANIFEST_NAME, CARD_NAME):
        assert hub.token not in (snapshot / name).read_text(encoding="utf-8")


@pytest.mark.slow
def test_accelerate_launch_with_two_cpu_processes_shares_stage1_and_gives_the_single_process_adapter(tmp_path):
    single = run_job(tmp_path / "cache-single", tmp_path / "single", steps=10)
    assert finish(single) == 6
    # accelerate 1.x starts several CPU processes with `--multi_gpu` (torchrun) plus ACCELERATE_USE_CPU=1;
    # its `--cpu --num_processes n` needs an MPI host file.
    launch = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "tests.edit_job",
            str(tmp_path / "cache-shared"),
            str(tmp_path / "shared"),
            "10",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"},
    )
    assert launch.returncode == 0, launch.stderr[-3000:]
    per_process = [int(line) for line in launch.stdout.split() if line.isdigit()]
    assert sorted(per_process) == [3, 3], f"the six concepts were not shared out: {launch.stdout[-500:]}"
    assert len(list((tmp_path / "cache-shared" / "stage1").glob("*.safetensors"))) == 6
    assert same_files(tmp_path / "single", tmp_path / "shared")
