import pytest

from diffusers_emcid.testing import toy_clip_tokenizer
from diffusers_emcid.tokens import check_prompt_lengths, subject_token_positions


@pytest.fixture(scope="module")
def tokenizer():
    return toy_clip_tokenizer()


def tokens(tokenizer, prompt):
    return tokenizer.convert_ids_to_tokens(tokenizer(prompt).input_ids)


def test_last_token_of_a_multi_token_subject(tokenizer):
    prompt = "painting by Van Gogh, a dog"
    (position,) = subject_token_positions(tokenizer, [prompt], "van gogh")
    assert tokens(tokenizer, prompt)[position] == "gogh</w>"
    # "xyz" is split into characters by the toy vocabulary: its last character is the subject token
    (position,) = subject_token_positions(tokenizer, ["a photo of xyz"], "XYZ")
    assert tokens(tokenizer, "a photo of xyz")[position] == "z</w>"


def test_first_whole_word_occurrence_wins(tokenizer):
    prompt = "a cat and a dog and a dog"
    (position,) = subject_token_positions(tokenizer, [prompt], "dog")
    assert position == tokens(tokenizer, prompt).index("dog</w>")
    # "art" inside "artwork" is not the word "art" that comes later
    prompt = "artwork of art"
    (position,) = subject_token_positions(tokenizer, [prompt], "art")
    assert position == len(tokens(tokenizer, prompt)) - 2


def test_absent_subject_and_long_prompt(tokenizer):
    with pytest.raises(ValueError, match="does not contain its source 'cow'"):
        subject_token_positions(tokenizer, ["a photo of a dog"], "cow")
    with pytest.raises(ValueError, match="over the text encoder's limit of 77"):
        check_prompt_lengths(tokenizer, ["a photo of " + "dog " * 80])


@pytest.mark.parametrize("blank", ["", " "])
def test_a_blank_subject_is_refused_with_a_clear_error(tokenizer, blank):
    with pytest.raises(ValueError, match=r"The subject .* is blank.*can only be destinations"):
        subject_token_positions(tokenizer, ["painting by "], blank)
