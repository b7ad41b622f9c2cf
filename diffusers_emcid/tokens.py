"""Tokenising prompts and locating the subject token (the last token of the source words).

The authors' code searches the decoded, space-stripped string, start-of-text marker included, which lets a
destination like "art" match inside "<|startoftext|>". We locate the words
in the prompt itself and map the characters to tokens with the fast tokenizer's offsets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from .requests import ConceptEdit, load_image


@dataclass
class TokenizedPrompts:
    """A batch of prompts padded to its longest prompt (as in stages 1 and 2 of the paper).

    Attributes:
        input_ids: (B, T) token ids.
        attention_mask: (B, T) ones on real tokens, zeros on padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device | str) -> "TokenizedPrompts":
        return TokenizedPrompts(self.input_ids.to(device), self.attention_mask.to(device))


def _word_pattern(words: str) -> re.Pattern[str]:
    """Case-insensitive pattern for `words` with any run of spaces between them."""
    return re.compile(r"\s+".join(re.escape(part) for part in words.split()), re.IGNORECASE)


def _find_words(prompt: str, words: str) -> re.Match[str] | None:
    """First whole-word occurrence of `words` in `prompt`, else the first occurrence inside a word."""
    pattern = _word_pattern(words)
    for match in pattern.finditer(prompt):
        before = prompt[match.start() - 1] if match.start() else " "
        after = prompt[match.end()] if match.end() < len(prompt) else " "
        if not (before.isalnum() and match.group()[0].isalnum()) and not (
            after.isalnum() and match.group()[-1].isalnum()
        ):
            return match
    return pattern.search(prompt)


def check_prompt_lengths(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> None:
    """Raises a ValueError naming the first prompt longer than the tokenizer's maximum length."""
    lengths = [len(ids) for ids in tokenizer(prompts).input_ids]
    for prompt, length in zip(prompts, lengths):
        if length > tokenizer.model_max_length:
            raise ValueError(
                f"The prompt {prompt!r} is {length} tokens long, over the text encoder's limit of "
                f"{tokenizer.model_max_length}; shorten the template or the concept."
            )


def tokenize(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> TokenizedPrompts:
    """Tokenises prompts, padded to the longest one (start and end markers included)."""
    batch = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    return TokenizedPrompts(batch.input_ids, batch.attention_mask)


def tokenize_as_pipeline(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> TokenizedPrompts:
    """Tokenises prompts as Stable Diffusion pipelines do before their text encoders: every prompt padded to the
    tokenizer's maximum length (77) with the tokenizer's own pad token (SD 1.x: the end marker; SD 2.x and SD-XL's
    second tokenizer: "!"). The encoders then run without an attention mask, so every position, padding included,
    is computed and read by the UNet.

    Returns:
        The ids, (B, model_max_length), and a mask of the real tokens (start and end markers included), which is
        not given to the encoder but tells the padding apart.
    """
    batch = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return TokenizedPrompts(batch.input_ids, batch.attention_mask)


def subject_token_positions(tokenizer: PreTrainedTokenizerBase, prompts: list[str], subject: str) -> list[int]:
    """Index of the last token of the first occurrence of `subject` in each prompt (case-insensitive).

    Raises:
        ValueError: if `subject` is blank, a prompt does not contain it, or its subject lies past the length limit.
    """
    if not subject.strip():
        raise ValueError(
            f"The subject {subject!r} is blank, so it has no token to locate; a source must name a concept (blank "
            "words such as '' or ' ' can only be destinations, e.g. to erase towards the unconditional prompt)."
        )
    positions = []
    for prompt in prompts:
        match = _find_words(prompt, subject)
        if match is None:
            raise ValueError(
                f"The prompt {prompt!r} does not contain its source {subject!r}; every template must "
                "contain '{}' so that the source is substituted into it."
            )
        if tokenizer.is_fast:
            offsets = tokenizer(prompt, return_offsets_mapping=True, truncation=True).offset_mapping
            covering = [
                i
                for i, (start, end) in enumerate(offsets)
                if end > start and start < match.end() and end > match.start()
            ]
            position = covering[-1] if covering else None
        else:  # slow tokenizers: count the tokens of the prompt up to the end of the subject
            ids = tokenizer(prompt[: match.end()], truncation=True).input_ids
            position = len(ids) - 2 if len(ids) >= 3 else None
        if position is None:
            raise ValueError(f"The source {subject!r} of prompt {prompt!r} lies past the tokenizer's length limit.")
        positions.append(position)
    return positions


def check_requests(requests: list[ConceptEdit], tokenizers: list[PreTrainedTokenizerBase]) -> None:
    """Fails fast, before any heavy work, on prompts a tokenizer cannot place and on images that cannot be read.

    Raises:
        ValueError: naming the request and the problem.
    """
    for request in requests:
        for image in request.images or ():
            try:
                load_image(image)
            except (OSError, ValueError) as error:
                raise ValueError(
                    f"ConceptEdit({request.source!r}): image {str(image)[:80]!r} cannot be used: {error}"
                ) from error
    for tokenizer in tokenizers:
        for request in requests:
            check_prompt_lengths(tokenizer, request.source_prompts + request.destination_prompts)
            subject_token_positions(tokenizer, request.source_prompts, request.source)
