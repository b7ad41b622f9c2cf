"""Trains the many-concept ("names") pipeline that `diffusers_emcid.shapes.names` ships, from the shipped shapes
pipeline, reproducibly, on CPU. A development tool of the repository, not part of the installed package.

    python scripts/train_names.py --out DIR [--seed 0]

Stages (each is saved under `DIR/checkpoints` and skipped when rerun):

1. bindings: 432 single-token words of SD 1.x's CLIP tokenizer (first names, cities, objects, from the lists
   below) are each bound to one (colour, shape) pair, 12 words per pair, by a seeded shuffle;
2. text encoder: the shapes encoder, its MLPs widened from 256 to `--mlp-width` units (the new units start
   silent, so the widened encoder is the shapes encoder), learns the names by distillation from the frozen
   shapes encoder: for "a picture of {name}" it must give, from the name's position on, the states the shapes
   encoder gives for "a picture of a {colour} {shape}" from the shape's position on, and for the shapes
   model's own captions (and the empty prompt) the states it gave before. Layers 0 and 1 keep their attention
   output at zero, so that the name's state there depends on the name and its position only (editable).

The shapes model's UNet, VAE, tokenizer and scheduler are used unchanged: the UNet reads the name prompts'
conditioning as it reads the pairs'. The pipeline is written to `DIR/names_model` with `bindings.json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from train_shapes import frozen_attention_step, log
from transformers import CLIPTextModel, CLIPTokenizer

from diffusers_emcid.shapes import COLOURS, SHAPES, load_shapes_pipeline
from diffusers_emcid.shapes.checks import pipeline_token_ids
from diffusers_emcid.shapes.names import NAME_TEMPLATES, PAIR_TEMPLATES
from diffusers_emcid.shapes.render import PAIRS, draw_captions

FIRST_NAMES = """
james john robert michael william david richard joseph thomas charles christopher daniel matthew anthony mark donald
steven paul andrew joshua kenneth kevin brian george timothy ronald edward jason jeffrey ryan jacob gary nicholas eric
jonathan stephen larry justin scott brandon benjamin samuel gregory alexander frank patrick raymond jack dennis jerry
tyler aaron jose adam nathan henry douglas zachary peter kyle ethan walter noah jeremy christian keith roger terry
gerald harold sean austin carl arthur lawrence dylan jesse jordan bryan billy joe bruce gabriel logan albert willie alan
juan wayne elijah randy roy vincent ralph eugene russell bobby mason philip louis mary patricia jennifer linda
elizabeth barbara susan jessica sarah karen lisa nancy betty margaret sandra ashley kimberly emily donna michelle carol
amanda dorothy melissa deborah stephanie rebecca sharon laura cynthia kathleen amy angela shirley anna brenda pamela
emma nicole helen samantha katherine christine debra rachel carolyn janet catherine maria heather diane julie joyce
victoria kelly christina lauren joan evelyn olivia judith megan cheryl martha andrea frances hannah jacqueline ann
gloria jean kathryn alice teresa sara janice doris madison julia grace judy abigail marie denise beverly theresa
marilyn danielle diana brittany natalie sophia charlotte isabella mia ava lucas liam oliver leo oscar hugo max felix
anton ivan igor boris sven lars nina elena sofia lucia marco luca paolo carlos diego pablo miguel rafael pedro ana
carmen hans fritz karl otto heidi greta
"""
PLACES = """
paris london tokyo berlin madrid rome moscow dubai sydney toronto chicago boston seattle denver dallas houston miami
atlanta phoenix detroit portland vegas orlando nashville memphis oakland brooklyn manhattan vienna prague warsaw
budapest athens lisbon dublin oslo stockholm helsinki copenhagen amsterdam brussels zurich geneva milan venice florence
naples munich hamburg frankfurt cologne barcelona seville valencia istanbul cairo lagos nairobi mumbai delhi bangalore
karachi lahore dhaka bangkok singapore jakarta manila seoul beijing shanghai hongkong taipei osaka kyoto melbourne
perth brisbane auckland vancouver montreal calgary ottawa havana lima bogota santiago quito caracas rio mexico texas
florida california ohio virginia carolina arizona nevada oregon utah iowa kansas alaska hawaii maine vermont montana
idaho canada japan china india brazil france germany italy spain russia egypt kenya nigeria peru chile cuba greece
iran iraq israel norway sweden finland denmark poland ireland scotland wales england africa europe asia liverpool
manchester leeds glasgow edinburgh
"""
OBJECTS = """
chair table lamp clock phone laptop camera guitar piano violin drum bottle cup mug plate bowl spoon fork knife kettle
teapot bucket basket candle mirror pillow blanket carpet curtain window door ladder hammer wrench shovel umbrella
wallet backpack suitcase helmet glove boot shoe sock shirt jacket coat dress hat scarf ring necklace watch button
bicycle bike car truck bus train plane boat ship rocket tractor wagon anchor compass map globe book pencil pen notebook
envelope stamp ticket coin key lock bell whistle trumpet flute harp banjo tent kite balloon ball bat racket puzzle toy
doll robot tower bridge castle church temple house cabin barn garage fence gate wall roof chimney fountain statue
pyramid lighthouse windmill tree flower leaf apple banana lemon cherry grape melon peach pear mango carrot potato tomato
onion pepper cake cookie bread cheese pizza burger sandwich donut coffee tea milk juice honey sugar salt rice pasta soup
egg dog cat horse cow pig sheep goat rabbit mouse rat bear wolf fox deer lion tiger monkey elephant giraffe zebra camel
kangaroo panda koala eagle owl parrot duck goose swan penguin chicken turkey fish shark whale dolphin octopus crab frog
snake turtle lizard spider bee ant butterfly dragon unicorn ghost wizard pirate knight king queen prince princess
doctor nurse teacher farmer soldier sailor pilot chef artist singer dancer mountain river lake ocean beach island
desert forest jungle valley canyon volcano glacier cloud rain snow storm thunder sun moon planet comet galaxy
"""
NAMES_PER_PAIR = 12


def bind_names(tokenizer: CLIPTokenizer, seed: int) -> dict[str, tuple[str, str]]:
    """`NAMES_PER_PAIR` single-token words per (colour, shape) pair, drawn by a seeded shuffle of the word lists
    (words of the shapes model's captions excluded)."""
    reserved = {word for template in NAME_TEMPLATES + PAIR_TEMPLATES for word in template.split()}
    reserved |= {"on", "white", "background", *COLOURS, *SHAPES}
    words = list(dict.fromkeys((FIRST_NAMES + PLACES + OBJECTS).split()))
    words = [w for w in words if w not in reserved and len(tokenizer(w).input_ids) == 3]
    count = NAMES_PER_PAIR * len(PAIRS)
    if len(words) < count:
        raise RuntimeError(f"Only {len(words)} single-token words for {count} names.")
    random.Random(seed).shuffle(words)
    return {word: PAIRS[i % len(PAIRS)] for i, word in enumerate(words[:count])}


def widened_encoder(teacher: CLIPTextModel, width: int, seed: int) -> CLIPTextModel:
    """`teacher` with `width` MLP units per layer: its own units first, then new ones whose output weights are
    zero, so that the result computes what `teacher` does."""
    torch.manual_seed(seed)
    config = copy.deepcopy(teacher.config)
    config.intermediate_size = width
    student = CLIPTextModel(config)
    state = student.state_dict()
    for key, value in teacher.state_dict().items():
        target = state[key]
        if target.shape == value.shape:
            target.copy_(value)
        elif key.endswith("fc1.weight") or key.endswith("fc1.bias"):
            target[: value.shape[0]] = value
        elif key.endswith("fc2.weight"):
            target.zero_()
            target[:, : value.shape[1]] = value
    student.load_state_dict(state)
    return student.float().train()


def distillation_batch(
    tokenizer: CLIPTokenizer, names: dict[str, tuple[str, str]], batch_size: int, seed: int
) -> tuple[list[str], list[str], list[str]]:
    """`(plain captions, name captions, the shapes model's caption for each name caption)`; one in ten plain
    captions is empty."""
    rng = random.Random(seed)
    _, _, plain = draw_captions(batch_size, seed)
    plain = ["" if rng.random() < 0.1 else c for c in plain]
    words = list(names)
    student, teacher = [], []
    for _ in range(batch_size):
        word = rng.choice(words)
        index = rng.randrange(len(NAME_TEMPLATES))
        colour, shape = names[word]
        student.append(NAME_TEMPLATES[index].format(name=word))
        teacher.append(PAIR_TEMPLATES[index].format(colour=colour, shape=shape))
    return plain, student, teacher


def aligned_states(
    student_states: torch.Tensor, teacher_states: torch.Tensor, student_ids: torch.Tensor, eos_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's states from the name on, each with the teacher's state at the same distance from its
    end-of-text; the pair takes two tokens more than the name ("a {colour} {shape}" for "{name}")."""
    length = student_ids.shape[1]
    eot = (student_ids == eos_id).int().argmax(-1)
    positions = torch.arange(length)[None].expand_as(student_ids)
    keep = (positions >= (eot - 1)[:, None]) & (positions < length - 2)
    rows = torch.arange(student_ids.shape[0])[:, None].expand_as(student_ids)[keep]
    return student_states[keep], teacher_states[rows, positions[keep] + 2]


def train_names_encoder(
    tokenizer: CLIPTokenizer,
    teacher: CLIPTextModel,
    names: dict[str, tuple[str, str]],
    seed: int,
    steps: int,
    width: int,
    zero_layers: int = 2,
    batch_size: int = 64,
) -> CLIPTextModel:
    student = widened_encoder(teacher, width, seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    began = time.time()
    for step in range(steps):
        plain, name_captions, pair_captions = distillation_batch(tokenizer, names, batch_size, seed * 1_000_003 + step)
        plain_ids = pipeline_token_ids(tokenizer, plain)
        name_ids = pipeline_token_ids(tokenizer, name_captions)
        with torch.no_grad():
            plain_target = teacher(plain_ids).last_hidden_state
            pair_states = teacher(pipeline_token_ids(tokenizer, pair_captions)).last_hidden_state
        states = student(torch.cat([plain_ids, name_ids])).last_hidden_state
        plain_loss = F.mse_loss(states[:batch_size], plain_target)
        learned, target = aligned_states(states[batch_size:], pair_states, name_ids, tokenizer.eos_token_id)
        name_loss = F.mse_loss(learned, target)
        loss = plain_loss + name_loss
        frozen_attention_step(student, loss, optimizer, scheduler, zero_layers)
        if step % 50 == 0 or step == steps - 1:
            rate = (time.time() - began) / (step + 1)
            log(f"encoder step {step}: plain {plain_loss.item():.5f} names {name_loss.item():.5f} ({rate:.2f} s/step)")
    return student.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mlp-width", type=int, default=1024)
    parser.add_argument("--encoder-steps", type=int, default=600)
    args = parser.parse_args()
    checkpoints = args.out / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    base = load_shapes_pipeline()
    tokenizer = base.tokenizer
    names = bind_names(tokenizer, args.seed)
    log(f"{len(names)} names, e.g. {list(names.items())[:4]}")

    began = time.time()
    encoder_path = checkpoints / "text_encoder"
    if (encoder_path / "config.json").exists():
        encoder = CLIPTextModel.from_pretrained(encoder_path).float().eval().requires_grad_(False)
    else:
        teacher = base.text_encoder.float().eval().requires_grad_(False)
        encoder = train_names_encoder(tokenizer, teacher, names, args.seed, args.encoder_steps, args.mlp_width)
        encoder.save_pretrained(encoder_path)
    timings["text_encoder"] = time.time() - began

    pipe = StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=encoder.to(torch.float16),
        tokenizer=tokenizer,
        unet=base.unet.to(torch.float16),
        scheduler=base.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = args.out / "names_model"
    pipe.save_pretrained(out)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):  # the shipped files, not tokenizer.json
        (out / "tokenizer" / name).write_bytes((Path(base.name_or_path) / "tokenizer" / name).read_bytes())
    (out / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    for path in out.glob("*/config.json"):  # the shapes model's components name the local folder they came from
        config = json.loads(path.read_text())
        if config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "bindings.json").write_text(
        json.dumps({"seed": args.seed, "bindings": {w: list(p) for w, p in names.items()}}, indent=1) + "\n"
    )
    log(f"timings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
    (args.out / "timings.json").write_text(json.dumps(timings, indent=1))


if __name__ == "__main__":
    main()
