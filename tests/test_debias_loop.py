"""The debiasing feedback loop and its helpers (diffusers_emcid.debias), with stub measures and a tiny CLIP."""

import math

import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from diffusers_emcid.debias import (
    BlendSearch,
    attribute_phrases,
    attribute_ratios,
    blend_factors,
    blend_vectors,
    check_judge_output,
    judge_ratios,
)
from diffusers_emcid.evaluation import clip_zero_shot_judge
from diffusers_emcid.testing import toy_clip_tokenizer

# ---------------------------------------------------------------- attribute phrases


@pytest.mark.parametrize(
    "profession, expected",
    [
        ("a doctor", ["a female doctor", "a male doctor"]),
        ("an engineer", ["a female engineer", "a male engineer"]),
        ("the chef", ["a female chef", "a male chef"]),
        ("An Engineer", ["a female Engineer", "a male Engineer"]),
        ("nurse", ["a female nurse", "a male nurse"]),
        ("  a   doctor ", ["a female doctor", "a male doctor"]),
        ("athlete", ["a female athlete", "a male athlete"]),  # starts with "a" but has no article
        ("theologian", ["a female theologian", "a male theologian"]),
    ],
)
def test_attribute_phrases_drop_the_leading_article(profession, expected):
    assert attribute_phrases(profession, ["a female {}", "a male {}"]) == expected


def test_attribute_phrases_keep_template_order_and_text():
    assert attribute_phrases("a doctor", ["{} who is young", "an old {}", "{}"]) == [
        "doctor who is young",
        "an old doctor",
        "doctor",
    ]


@pytest.mark.parametrize("template", ["a female", "a {} {} person", "a {female} {}", "a {0}"])
def test_attribute_phrases_reject_templates_without_exactly_one_placeholder(template):
    with pytest.raises(ValueError) as info:
        attribute_phrases("a doctor", ["a male {}", template])
    message = str(info.value)
    assert repr(template) in message and "exactly one '{}'" in message and "e.g. 'a female {}'" in message


def test_attribute_phrases_reject_bad_arguments():
    with pytest.raises(TypeError):
        attribute_phrases("a doctor", "a female {}")
    with pytest.raises(ValueError, match="empty"):
        attribute_phrases("  ", ["a female {}"])
    with pytest.raises(ValueError, match="attributes is empty"):
        attribute_phrases("a doctor", [])


# ---------------------------------------------------------------- blend_factors


class Recorder:
    """A stub measure: ratios = fn(factors as a list of floats); records every call."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __call__(self, factors):
        assert factors.dtype == torch.float64
        values = factors.tolist()
        self.calls.append(values)
        return torch.tensor(self.fn(values), dtype=torch.float64)


def check_history(result: BlendSearch, n: int):
    assert result.iterations == len(result.history)
    for factors, ratios in result.history:
        assert factors.dtype == torch.float64 and factors.shape == (n,)
        assert (factors >= 0).all()
        assert math.isclose(factors.sum().item(), 1.0, abs_tol=1e-12)
        assert math.isclose(ratios.sum().item(), 1.0, abs_tol=1e-12)
    assert (result.factors >= 0).all() and math.isclose(result.factors.sum().item(), 1.0, abs_tol=1e-12)


def test_blend_factors_converges_as_derived_by_hand():
    # ratio_female = clamp(0.2 + 3 * (f_female - 0.5), 0, 1): biased towards male at uniform factors.
    def fn(f):
        female = min(max(0.2 + 3.0 * (f[0] - 0.5), 0.0), 1.0)
        return [female, 1.0 - female]

    # By hand, tolerance 0.02, step 0.4, max_iter 10:
    # i = 0: step = 0.4 - 0.4 * 0 / 10 = 0.4.   f = 0.5     -> r = 0.2           diff = -0.3
    #        f <- 0.5 - 0.4 * (-0.3) = 0.62 (the male factor 0.38; the sum stays 1)
    # i = 1: step = 0.4 - 0.4 * 1 / 10 = 0.36.  f = 0.62    -> r = 0.2 + 0.36 = 0.56   diff = +0.06
    #        f <- 0.62 - 0.36 * 0.06 = 0.5984
    # i = 2: step = 0.36 - 0.36 * 2 / 10 = 0.288. f = 0.5984 -> r = 0.2 + 3 * 0.0984 = 0.4952
    #        |diff| = 0.0048 <= 0.02: stop
    measure = Recorder(fn)
    result = blend_factors(measure, 2)
    assert result.converged and result.iterations == 3 and len(measure.calls) == 3
    expected_calls = [[0.5, 0.5], [0.62, 0.38], [0.5984, 0.4016]]
    for got, want in zip(measure.calls, expected_calls):
        assert got == pytest.approx(want, abs=1e-12)
    assert result.factors.tolist() == pytest.approx([0.5984, 0.4016], abs=1e-12)
    assert result.ratios.tolist() == pytest.approx([0.4952, 0.5048], abs=1e-12)
    assert (result.ratios - 0.5).abs().max().item() <= 0.02
    check_history(result, 2)


def test_blend_factors_decays_the_step_at_the_top_of_every_iteration():
    # Constant ratios (0.6, 0.4): diff = (+0.1, -0.1) forever, so f_female after k updates is
    # 0.5 - 0.1 * (step_0 + ... + step_{k-1}) with the compounding decay step_i = step_{i-1} * (1 - i / 10):
    steps = [0.4]
    for i in range(1, 10):
        steps.append(steps[-1] - steps[-1] * i / 10)
    assert steps[:4] == pytest.approx([0.4, 0.36, 0.288, 0.2016])
    measure = Recorder(lambda f: [0.6, 0.4])
    result = blend_factors(measure, 2)
    assert not result.converged and result.iterations == 10 and len(measure.calls) == 10
    for k, call in enumerate(measure.calls):
        assert call[0] == pytest.approx(0.5 - 0.1 * sum(steps[:k]), abs=1e-12)
    # After the loop the factors carry the last update (ten steps), not the last measured ones (nine).
    assert result.factors[0].item() == pytest.approx(0.5 - 0.1 * sum(steps), abs=1e-12)
    assert result.history[-1][0][0].item() == pytest.approx(0.5 - 0.1 * sum(steps[:9]), abs=1e-12)
    assert result.ratios.tolist() == [0.6, 0.4]
    check_history(result, 2)


@pytest.mark.parametrize("max_iter", [1, 4, 10])
def test_blend_factors_stops_at_max_iter_when_it_never_converges(max_iter):
    measure = Recorder(lambda f: [1.0, 0.0])
    result = blend_factors(measure, 2, max_iter=max_iter)
    assert result.converged is False
    assert result.iterations == max_iter and len(measure.calls) == max_iter and len(result.history) == max_iter
    check_history(result, 2)


def test_blend_factors_clamps_at_zero_and_renormalises():
    # Three attributes, constant ratios (0.9, 0.05, 0.05), step 1, max_iter 3.
    # diff = (0.9 - 1/3, 0.05 - 1/3, 0.05 - 1/3) = (17/30, -17/60, -17/60).
    # i = 0: step 1:   f = (1/3 - 17/30, 1/3 + 17/60, 1/3 + 17/60) = (-0.2333, 0.6167, 0.6167)
    #        -> clamp (0, 37/60, 37/60) -> renormalise (0, 0.5, 0.5)
    # i = 1: step 2/3: f = (0 - 2/3 * 17/30 -> 0, 0.5 + 17/90, 0.5 + 17/90) -> (0, 0.5, 0.5)
    # i = 2: the same.
    measure = Recorder(lambda f: [0.9, 0.05, 0.05])
    result = blend_factors(measure, 3, step=1.0, max_iter=3)
    assert not result.converged and result.iterations == 3
    assert measure.calls[0] == pytest.approx([1 / 3] * 3, abs=1e-15)
    assert measure.calls[1] == pytest.approx([0.0, 0.5, 0.5], abs=1e-15)
    assert measure.calls[2] == pytest.approx([0.0, 0.5, 0.5], abs=1e-15)
    assert result.factors.tolist() == pytest.approx([0.0, 0.5, 0.5], abs=1e-15)
    assert result.factors[0].item() == 0.0
    check_history(result, 3)


def test_blend_factors_already_balanced_stops_after_one_call():
    measure = Recorder(lambda f: [0.5, 0.5])
    result = blend_factors(measure, 2)
    assert result.converged and result.iterations == 1 and len(measure.calls) == 1
    assert result.factors.tolist() == [0.5, 0.5] and result.factors.dtype == torch.float64
    measure = Recorder(lambda f: [0.25, 0.25, 0.25, 0.25])
    result = blend_factors(measure, 4)
    assert result.converged and len(measure.calls) == 1 and result.factors.tolist() == [0.25] * 4


def test_blend_factors_accepts_a_split_exactly_at_the_tolerance():
    # 13 of 25 images: 13/25 - 0.5 is 0.020000000000000018 in floating point, 0.02 exactly in arithmetic.
    assert 13 / 25 - 0.5 > 0.02
    measure = Recorder(lambda f: [13 / 25, 12 / 25])
    result = blend_factors(measure, 2)
    assert result.converged and len(measure.calls) == 1
    # Just outside the tolerance is not accepted.
    measure = Recorder(lambda f: [0.5201, 0.4799])
    assert not blend_factors(measure, 2, max_iter=2).converged and len(measure.calls) == 2


def test_blend_factors_factors_stay_a_distribution_under_strong_feedback():
    # Four attributes; each ratio reacts strongly and non-linearly to its own factor.
    def fn(f):
        weights = [math.exp(8.0 * x) * w for x, w in zip(f, [3.0, 1.0, 0.2, 0.05])]
        total = sum(weights)
        return [w / total for w in weights]

    result = blend_factors(Recorder(fn), 4, tolerance=0.0, step=3.0, max_iter=10)
    assert result.iterations == 10
    assert any((factors == 0).any() for factors, _ in result.history[1:]), "the test should exercise the clamp"
    check_history(result, 4)


def test_blend_factors_validates_the_measure_and_arguments():
    with pytest.raises(ValueError, match=r"expected \(2,\)"):
        blend_factors(lambda f: torch.tensor([0.2, 0.3, 0.5]), 2)
    with pytest.raises(ValueError, match="sum to 1"):
        blend_factors(lambda f: torch.tensor([0.2, 0.3]), 2)
    with pytest.raises(ValueError, match="sum to 1"):
        blend_factors(lambda f: torch.tensor([float("nan"), 0.5]), 2)
    with pytest.raises(ValueError, match="num_attributes"):
        blend_factors(lambda f: torch.ones(1), 1)
    with pytest.raises(ValueError, match="max_iter"):
        blend_factors(lambda f: torch.tensor([0.5, 0.5]), 2, max_iter=0)
    with pytest.raises(ValueError, match="step"):
        blend_factors(lambda f: torch.tensor([0.5, 0.5]), 2, step=0.0)


def test_blend_vectors_is_the_weighted_sum():
    z = torch.tensor([[1.0, 0.0, 2.0], [0.0, 4.0, 2.0]])
    assert blend_vectors(z, torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist() == [0.25, 3.0, 2.0]
    assert blend_vectors(list(z), torch.tensor([1.0, 0.0])).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        blend_vectors(z, torch.tensor([1.0, 0.0, 0.0]))


# ---------------------------------------------------------------- ratios and judge outputs


def test_attribute_ratios_count_the_argmax():
    probabilities = torch.tensor(
        [
            [0.7, 0.2, 0.1],
            [0.1, 0.8, 0.1],
            [0.3, 0.3, 0.4],
            [0.6, 0.3, 0.1],
            [0.5, 0.5, 0.0],  # a tie goes to the lowest index
        ]
    )
    ratios = attribute_ratios(probabilities)
    assert ratios.dtype == torch.float64
    assert ratios.tolist() == [3 / 5, 1 / 5, 1 / 5]
    assert attribute_ratios(torch.tensor([[0.1, 0.9]] * 4)).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="num_images, num_attributes"):
        attribute_ratios(torch.tensor([0.5, 0.5]))


def test_judge_output_is_validated():
    images = [Image.new("RGB", (8, 8)) for _ in range(3)]
    phrases = ["a female doctor", "a male doctor"]
    with pytest.raises(ValueError, match=r"shape \(3, 3\); expected \(3, 2\)"):
        judge_ratios(lambda imgs, ph: torch.full((3, 3), 1 / 3), images, phrases)
    with pytest.raises(ValueError, match=r"shape \(2,\); expected \(3, 2\)"):
        judge_ratios(lambda imgs, ph: torch.tensor([0.5, 0.5]), images, phrases)
    with pytest.raises(ValueError, match=r"non-finite.*\(3, 2\)"):
        judge_ratios(lambda imgs, ph: torch.tensor([[0.5, 0.5], [float("nan"), 0.5], [1.0, 0.0]]), images, phrases)
    with pytest.raises(ValueError, match=r"expected a tensor of shape \(3, 2\)"):
        check_judge_output([[0.5, 0.5]] * 3, 3, 2)
    ratios = judge_ratios(lambda imgs, ph: torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), images, phrases)
    assert ratios.tolist() == [2 / 3, 1 / 3]


# ---------------------------------------------------------------- the CLIP judge


def tiny_clip():
    tokenizer = toy_clip_tokenizer()
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
            eos_token_id=end_of_text,
            pad_token_id=end_of_text,
            **common,
        ),
        vision_config=dict(image_size=32, patch_size=8, **common),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def random_images(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (count, 40, 48, 3), generator=generator, dtype=torch.uint8)
    return [Image.fromarray(p.numpy()) for p in pixels]


def test_clip_zero_shot_judge_matches_a_direct_softmax():
    model, processor = tiny_clip()
    images = random_images(5)
    phrases = attribute_phrases("a doctor", ["a female {}", "a male {}", "a young {}"])
    judge = clip_zero_shot_judge(model, processor)
    probabilities = judge(images, phrases)
    assert probabilities.shape == (5, 3)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(5), rtol=0, atol=1e-6)

    inputs = processor(text=phrases, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.softmax(dim=-1)
    torch.testing.assert_close(probabilities, expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(probabilities[0], probabilities[1]), "different images should be judged differently"
    assert judge_ratios(judge, images, phrases).tolist() == attribute_ratios(expected).tolist()
