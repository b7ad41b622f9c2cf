"""`EMCIDEditor`: the entry point that runs statistics, stage 1 and stage 2 on a pipeline."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterable, Iterator

import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from tqdm.auto import tqdm

from .cache import ModuleFingerprints, TensorCache, digest
from .config import EMCIDConfig
from .edits import ConceptEdits, base_weights_fingerprint
from .encoders import find_text_encoder_layout, module_device
from .errors import EMCIDNumericalError
from .hooks import adapters_disabled, frozen
from .requests import ConceptEdit, as_concept_edits, canonical_order
from .stage1 import Stage1Result, optimize_concept_vector
from .stage2 import compute_stage2_deltas
from .statistics import CaptionSource, KeyStatistics, compute_key_second_moments, load_captions, sample_captions
from .tokens import check_prompt_lengths, subject_token_positions

logger = logging.getLogger(__name__)

STAGE1_FORMAT = "emcid-stage1-v1"
STATISTICS_FORMAT = "emcid-statistics-v1"


class EMCIDEditor:
    """Edits concepts of a Stable Diffusion pipeline's text encoder with EMCID.

    The pipeline is never modified: `edit` returns `ConceptEdits`, which `ConceptEdits.apply` adds to
    a pipeline as a LoRA adapter. Work is computed against the base weights (adapters of the pipeline
    are switched off meanwhile).

    Args:
        pipe: a Stable Diffusion 1.x pipeline (CLIP text encoder, UNet, VAE, scheduler).
        config: the hyperparameters; defaults to the `"sd1-paper"` preset.
        cache_dir: where stage-1 vectors and key statistics are cached; defaults to `$EMCID_CACHE` or
            `emcid/` under the Hugging Face cache home.
        progress: show progress bars.

    Example:
        ```py
        editor = EMCIDEditor(pipe)
        editor.compute_statistics(captions)
        edits = editor.edit([("dog", "cat")])
        edits.apply(pipe)
        ```
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        config: EMCIDConfig | None = None,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise ValueError(
                f"{type(pipe).__name__} has two text encoders (SD-XL); this version of diffusers-emcid edits pipelines "
                "with one CLIP text encoder (Stable Diffusion 1.x)."
            )
        missing = [name for name in ("text_encoder", "tokenizer", "unet", "vae", "scheduler") if getattr(pipe, name, None) is None]
        if missing:
            raise ValueError(f"{type(pipe).__name__} lacks {missing}; EMCID needs a Stable Diffusion pipeline.")
        self.pipe = pipe
        self.config = config if config is not None else EMCIDConfig.from_preset("sd1-paper")
        self.layout = find_text_encoder_layout(pipe.text_encoder)
        self.layers, self.z_layer = self.config.resolve_layers(self.layout.num_layers)
        self.cache = TensorCache(cache_dir)
        self.progress = progress
        self._fingerprint = ModuleFingerprints()
        self._statistics: KeyStatistics | None = None

    # ---------------------------------------------------------------- shared plumbing

    @contextlib.contextmanager
    def _base_model(self) -> Iterator[torch.device]:
        """The pipeline's networks frozen, with adapters off, on the work device; all restored afterwards."""
        modules = [self.pipe.text_encoder, self.pipe.unet, self.pipe.vae]
        fused = [name for m in modules for name, layer in m.named_modules() if isinstance(layer, BaseTunerLayer) and layer.merged]
        if fused:
            raise ValueError(
                f"The pipeline has fused LoRA weights (e.g. {fused[0]}); EMCID edits the base model. Call "
                "pipe.unfuse_lora() (or unfuse_concept_edits()) first."
            )
        homes = [module_device(m) for m in modules]
        device = torch.device(self.config.device) if self.config.device else homes[0]
        with adapters_disabled(*modules), frozen(*modules):
            try:
                for module in modules:
                    module.to(device)
                yield device
            finally:
                for module, home in zip(modules, homes):
                    module.to(home)

    @staticmethod
    def _statistics_prefix(model_fingerprint: str, layer: int) -> str:
        """Statistics entries are named `{model}-layer{l}-{captions}`, so a model's entries can be listed."""
        return f"{model_fingerprint[:32]}-layer{layer}-"

    # ---------------------------------------------------------------- statistics

    def compute_statistics(
        self,
        captions: CaptionSource,
        *,
        column: str | None = None,
        split: str = "train",
        num_samples: int | None = None,
    ) -> dict[int, torch.Tensor]:
        """Computes (or loads from the cache) C = E[k k^T] of every edited layer on the unedited model.

        Args:
            captions: a list of captions, a `.txt`/`.json`/`.jsonl` file, or a `datasets` name (with `column`).
            column: the caption field of JSON rows or dataset rows.
            split: the dataset split.
            num_samples: how many captions to use; defaults to `config.statistics_num_samples`.

        Returns:
            {layer: C (d_ff, d_ff) float32}.
        """
        texts = sample_captions(load_captions(captions, column, split), num_samples or self.config.statistics_num_samples)
        suffix = digest(STATISTICS_FORMAT, digest(texts))[:32]
        with self._base_model():
            model_fingerprint = self._fingerprint(self.pipe.text_encoder)
            statistics = self._load_statistics(model_fingerprint, suffix)
            if statistics is None:
                covariances, count = compute_key_second_moments(
                    self.layout, self.pipe.tokenizer, texts, self.layers, self.config.statistics_batch_size, self.progress
                )
                for layer, covariance in covariances.items():
                    self.cache.save("statistics", self._statistics_prefix(model_fingerprint, layer) + suffix, {"mom2": covariance},
                                    {"num_captions": str(len(texts)), "num_tokens": str(count), "layer": str(layer)})
                statistics = KeyStatistics(covariances, count, model_fingerprint)
        message = statistics.rank_deficiency(self.layout.intermediate_size)
        if message:
            logger.warning(message)
        self._statistics = statistics
        return dict(statistics.covariances)

    def _load_statistics(self, model_fingerprint: str, caption_set: str) -> KeyStatistics | None:
        """The cached statistics of one caption set, if every edited layer has them."""
        entries = {layer: self.cache.load("statistics", self._statistics_prefix(model_fingerprint, layer) + caption_set)
                   for layer in self.layers}
        if any(entry is None for entry in entries.values()):
            return None
        counts = {int(entry[1].get("num_tokens", 0)) for entry in entries.values()}
        return KeyStatistics({layer: entry[0]["mom2"] for layer, entry in entries.items()}, min(counts), model_fingerprint)

    def _statistics_for(self, model_fingerprint: str) -> KeyStatistics:
        """The statistics of this model: from memory, else from the newest cached caption set that covers
        every edited layer (layers never mix caption sets)."""
        if self._statistics is not None and self._statistics.model_fingerprint == model_fingerprint and all(
            layer in self._statistics.covariances for layer in self.layers
        ):
            return self._statistics
        newest: dict[str, float] = {}
        for layer in self.layers:
            prefix = self._statistics_prefix(model_fingerprint, layer)
            for path in self.cache.find("statistics", prefix):
                caption_set = path.stem.removeprefix(prefix)
                newest[caption_set] = max(newest.get(caption_set, 0.0), path.stat().st_mtime)
        for caption_set in sorted(newest, key=newest.__getitem__, reverse=True):
            statistics = self._load_statistics(model_fingerprint, caption_set)
            if statistics is not None:
                self._statistics = statistics
                return statistics
        raise ValueError(
            f"No key statistics for layers {self.layers} of this text encoder (from one caption set). Call "
            "editor.compute_statistics(captions) once with many captions (the paper used 100,000 CCS captions): a "
            "list of strings, a .txt/.json/.jsonl file, or a dataset name with column='caption'. They are cached "
            f"under {self.cache.root / 'statistics'} and found again by later runs."
        )

    # ---------------------------------------------------------------- editing

    def _check_requests(self, requests: list[ConceptEdit]) -> None:
        tokenizer = self.pipe.tokenizer
        for request in requests:
            check_prompt_lengths(tokenizer, request.source_prompts + request.destination_prompts)
            subject_token_positions(tokenizer, request.source_prompts, request.source)

    def _stage1_key(self, request: ConceptEdit, model_digest: str) -> str:
        return digest(STAGE1_FORMAT, model_digest, request.fingerprint(), self.config.stage1_settings(self.z_layer))

    def edit(self, requests: Iterable[ConceptEdit | tuple[str, str]]) -> ConceptEdits:
        """Computes the edits of all `requests` jointly; the pipeline's weights are not changed.

        Stage-1 vectors are cached on disk by content, so a repeated or interrupted run recomputes only
        what is missing. The result keeps the concepts in a canonical order (by source), so it does not
        depend on the order of `requests`.

        Args:
            requests: `ConceptEdit`s, or `(source, destination)` tuples with the default templates.

        Returns:
            The `ConceptEdits`; call `.apply(pipe)` to use them.

        Raises:
            ValueError / TypeError: for bad requests (before any heavy work), or when no key statistics exist.
            EMCIDNumericalError: for rank-deficient statistics (before any heavy work), or concepts whose stage 1
                diverged (after the others were computed and cached).
        """
        requests = canonical_order(as_concept_edits(requests))
        self._check_requests(requests)
        with self._base_model() as device:
            fingerprints = {name: self._fingerprint(getattr(self.pipe, name)) for name in ("text_encoder", "unet", "vae")}
            self._statistics_for(fingerprints["text_encoder"]).check_rank(self.layout.intermediate_size)
            scheduler = {k: v for k, v in self.pipe.scheduler.config.items() if not k.startswith("_")}  # "_..." keys vary run to run
            model_digest = digest(fingerprints, scheduler, sorted(self.pipe.tokenizer.get_vocab().items()))
            noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
            results: list[Stage1Result] = []
            failures: list[str] = []
            bar = tqdm(requests, desc="EMCID stage 1", unit="concept", disable=not self.progress)
            for request in bar:
                key = self._stage1_key(request, model_digest)
                entry = self.cache.load("stage1", key)
                if entry is not None:
                    tensors = entry[0]
                    result = Stage1Result(tensors["vector"], tensors["h0"], tensors["losses"], int(tensors["clamp_hits"]))
                else:
                    try:
                        result = optimize_concept_vector(
                            self.pipe, self.layout, request, self.config, self.z_layer, noise_scheduler, device
                        )
                    except EMCIDNumericalError as error:
                        failures.append(str(error))
                        continue
                    self.cache.save("stage1", key, {"vector": result.vector, "h0": result.h0, "losses": result.losses,
                                                    "clamp_hits": torch.tensor(result.clamp_hits)},
                                    {"source": request.source, "destination": request.destination})
                if self.config.num_steps and result.clamp_hits == self.config.num_steps:
                    logger.warning(
                        "Stage 1 of %r -> %r: the norm bound clamp_norm_factor * ||h0|| was hit at every one of %d steps, "
                        "so the edit is as strong as the bound allows, not as the loss asks. Lower learning_rate (now %g) "
                        "or raise clamp_norm_factor (now %g).", request.source, request.destination, self.config.num_steps,
                        self.config.learning_rate, self.config.clamp_norm_factor,
                    )
                results.append(result)
                bar.set_postfix_str(f"{request.source!r} cached" if entry is not None else f"{request.source!r} done")
            if failures:
                raise EMCIDNumericalError(
                    f"Stage 1 failed for {len(failures)} of {len(requests)} concepts (the others are cached, so a rerun "
                    "computes only these):\n- " + "\n- ".join(failures)
                )
            vectors = torch.stack([result.vector for result in results])
            edits = self._solve(requests, {"text_encoder": vectors}, fingerprints["text_encoder"])
        edits.stage1_losses = [result.losses for result in results]
        return edits

    def solve(self, requests: Iterable[ConceptEdit | tuple[str, str]], vectors: dict[str, torch.Tensor]) -> ConceptEdits:
        """Stage 2 alone: writes concepts with known stage-1 vectors into the text encoder's layers.

        Args:
            requests: the concepts (their prompts give the keys).
            vectors: {"text_encoder": Z (N, d)}, one row per request.
        """
        requests = as_concept_edits(requests)
        if any(v.shape[0] != len(requests) for v in vectors.values()):
            raise ValueError(f"Got {[tuple(v.shape) for v in vectors.values()]} vectors for {len(requests)} requests.")
        ordered = canonical_order(requests)
        rows = [requests.index(request) for request in ordered]
        vectors = {name: v[rows] for name, v in vectors.items()}
        self._check_requests(ordered)
        with self._base_model():
            return self._solve(ordered, vectors, self._fingerprint(self.pipe.text_encoder))

    def _solve(self, requests: list[ConceptEdit], vectors: dict[str, torch.Tensor], model_fingerprint: str) -> ConceptEdits:
        """`solve` for canonically ordered requests, inside `_base_model()`, for a text encoder of known fingerprint."""
        statistics = self._statistics_for(model_fingerprint)
        statistics.check_rank(self.layout.intermediate_size)
        deltas = compute_stage2_deltas(
            self.layout, self.pipe.tokenizer, requests, vectors["text_encoder"], self.layers, self.z_layer,
            statistics.covariances, self.config.edit_weight, self.config.preservation_weight, self.config.residual,
            self.config.stage2_batch_size, self.progress,
        )
        return ConceptEdits(
            requests=list(requests),
            vectors={name: v.float().cpu() for name, v in vectors.items()},
            deltas={"text_encoder": deltas},
            config=self.config,
            z_layer=self.z_layer,
            base_model=getattr(self.pipe, "name_or_path", None) or None,
            base_fingerprints={"text_encoder": base_weights_fingerprint(self.layout, self.layers)},
        )
