"""Procedural synthetic VQA: the embedded default dataset (no download).

PIL-drawn scenes on a light grey background, one question type per example (cycling
through `question_types` by index, so types are balanced):

  color     one large shape, centred        "What color is the shape?"    → "red"
  shape     one large shape, centred        "What shape is shown?"        → "circle"
  count     1-4 small shapes in a 3×3 grid  "How many shapes are there?"  → "3"
  position  a shape at the left/right/top/bottom (plus one distractor of another colour
            elsewhere)                      "Where is the red shape?"     → "left"
  text      a short word in PIL's default font  "What word is written?"   → "cat"

Colour and shape scenes hold one large shape in saturated colours on a plain background,
so a tiny model can learn them quickly. Answers are single words.

Determinism and splits. Example `index` of split `split` is drawn from
`numpy.random.default_rng(SeedSequence([seed, split_id, index]))`: the same
(seed, split, index) gives the same bytes on every machine. Train and eval are disjoint
by construction: each scene is described by an integer parameter tuple (type, shapes,
colours, positions, sizes, shades, word, font size); its hash puts it in the eval bucket
(1 in 4) or the train bucket, and a split redraws until the tuple falls in its own bucket.
No scene can therefore appear in both splits; concepts (a red circle) are shared, only
exact scenes are held out.

Examples carry: id, image (uint8 [R, R, 3]), conversations (LLaVA format), question_type,
answer (the gpt turn: the short answer, or the caption with style='caption'),
vqa_answer, caption. style='caption' puts the caption in the gpt turn (stage-1 'plain').

Export to LLaVA JSON + PNG files:
  python -m leo_mini_jax.data.synthetic --out DIR --split train --num N --resolution R
"""

import argparse
import hashlib
import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 30),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
POSITIONS = ("left", "right", "top", "bottom")
WORDS = ("cat", "dog", "sun", "car", "hat", "box", "cup", "pen", "bus", "map")
QUESTION_TYPES = ("color", "shape", "count", "position", "text")
QUESTIONS = {
    "color": "What color is the shape?",
    "shape": "What shape is shown?",
    "count": "How many shapes are there?",
    "position": "Where is the {color} shape?",
    "text": "What word is written?",
}
CAPTION_PROMPT = "Describe the image briefly."
SPLIT_IDS = {"train": 0, "eval": 1}
EVAL_BUCKETS = 4  # one scene hash in EVAL_BUCKETS belongs to eval
BACKGROUND = (235, 235, 235)
TEXT_COLOR = (25, 25, 25)
MAX_SHADE = 20  # per-channel jitter of a colour; keeps every colour unambiguous
# Region centres as fractions of the side, for the position questions.
_REGION_CENTRES = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2),
                   "bottom": (0.5, 0.8)}


def scene_split(params: tuple) -> str:
  """The split a scene belongs to ('train' or 'eval'), by the hash of what is drawn.

  The question type (params[0]) is left out: a colour scene and a shape scene with the
  same drawing land in the same split, so no image is shared between splits.
  """
  digest = hashlib.blake2b(repr(params[1:]).encode(), digest_size=8).digest()
  return "eval" if int.from_bytes(digest, "little") % EVAL_BUCKETS == 0 else "train"


def _shade(rng: np.random.Generator) -> tuple[int, int, int]:
  return tuple(int(x) for x in rng.integers(-MAX_SHADE, MAX_SHADE + 1, size=3))


def _shape_item(rng, size_lo: float, size_hi: float, centre: tuple[float, float],
                jitter: float, resolution: int, shape: int | None = None,
                color: int | None = None) -> tuple:
  """(shape, colour, cx, cy, half_size, shade) in integer pixels."""
  r = resolution
  shape = int(rng.integers(len(SHAPES))) if shape is None else shape
  color = int(rng.integers(len(COLORS))) if color is None else color
  half = int(rng.integers(max(2, round(size_lo * r / 2)), max(3, round(size_hi * r / 2)) + 1))
  j = max(1, round(jitter * r))
  cx = int(round(centre[0] * r)) + int(rng.integers(-j, j + 1))
  cy = int(round(centre[1] * r)) + int(rng.integers(-j, j + 1))
  return (shape, color, cx, cy, half, _shade(rng))


def _draw_params(qtype: str, rng: np.random.Generator, resolution: int) -> tuple:
  """Integer parameter tuple of one scene (everything the renderer needs)."""
  if qtype in ("color", "shape"):
    return (qtype, _shape_item(rng, 0.5, 0.7, (0.5, 0.5), 0.06, resolution))
  if qtype == "count":
    n = int(rng.integers(1, 5))
    cells = rng.choice(9, size=n, replace=False)
    items = tuple(
        _shape_item(rng, 0.16, 0.2, ((c % 3 + 0.5) / 3, (c // 3 + 0.5) / 3), 0.03,
                    resolution)
        for c in sorted(int(c) for c in cells))
    return (qtype, items)
  if qtype == "position":
    regions = rng.permutation(len(POSITIONS))[:2]
    colors = rng.permutation(len(COLORS))[:2]
    target = _shape_item(rng, 0.28, 0.34, _REGION_CENTRES[POSITIONS[regions[0]]], 0.04,
                         resolution, color=int(colors[0]))
    other = _shape_item(rng, 0.2, 0.26, _REGION_CENTRES[POSITIONS[regions[1]]], 0.04,
                        resolution, color=int(colors[1]))
    return (qtype, int(regions[0]), int(regions[1]), target, other)
  if qtype == "text":
    word = int(rng.integers(len(WORDS)))
    font_size = int(rng.integers(round(0.3 * resolution), round(0.4 * resolution) + 1))
    j = max(1, round(0.05 * resolution))
    dx, dy = (int(v) for v in rng.integers(-j, j + 1, size=2))
    return (qtype, word, font_size, dx, dy)
  raise ValueError(f"unknown synthetic question type {qtype!r}; known: {QUESTION_TYPES}")


def _paint_shape(draw: ImageDraw.ImageDraw, item: tuple, scale: int):
  shape, color, cx, cy, half, shade = item
  rgb = tuple(int(np.clip(c + s, 0, 255)) for c, s in zip(COLORS[COLOR_NAMES[color]], shade))
  cx, cy, h = cx * scale, cy * scale, half * scale
  name = SHAPES[shape]
  if name == "circle":
    draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=rgb)
  elif name == "square":
    draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=rgb)
  elif name == "triangle":
    draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=rgb)
  elif name == "diamond":
    draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=rgb)
  elif name == "cross":
    w = h // 3
    draw.rectangle((cx - h, cy - w, cx + h, cy + w), fill=rgb)
    draw.rectangle((cx - w, cy - h, cx + w, cy + h), fill=rgb)


def render(params: tuple, resolution: int) -> np.ndarray:
  """uint8 [R, R, 3] image of a scene. Shapes are drawn 4× larger and downsampled."""
  qtype = params[0]
  if qtype == "text":
    _, word, font_size, dx, dy = params
    image = Image.new("RGB", (resolution, resolution), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=font_size)
    left, top, right, bottom = draw.textbbox((0, 0), WORDS[word], font=font)
    x = (resolution - (right - left)) // 2 - left + dx
    y = (resolution - (bottom - top)) // 2 - top + dy
    draw.text((x, y), WORDS[word], fill=TEXT_COLOR, font=font)
    return np.asarray(image, dtype=np.uint8)
  scale = 4
  image = Image.new("RGB", (resolution * scale, resolution * scale), BACKGROUND)
  draw = ImageDraw.Draw(image)
  if qtype in ("color", "shape"):
    items = [params[1]]
  elif qtype == "count":
    items = list(params[1])
  else:  # position
    items = [params[3], params[4]]
  for item in items:
    _paint_shape(draw, item, scale)
  image = image.resize((resolution, resolution), Image.Resampling.BOX)
  return np.asarray(image, dtype=np.uint8)


def describe(params: tuple) -> dict[str, str]:
  """question, answer and caption of a scene."""
  qtype = params[0]
  def name(item):  # "a red circle", "an orange square"
    color = COLOR_NAMES[item[1]]
    return ("an " if color[0] in "aeiou" else "a ") + f"{color} {SHAPES[item[0]]}"
  if qtype in ("color", "shape"):
    item = params[1]
    answer = COLOR_NAMES[item[1]] if qtype == "color" else SHAPES[item[0]]
    return dict(question=QUESTIONS[qtype], answer=answer, caption=name(item))
  if qtype == "count":
    n = len(params[1])
    return dict(question=QUESTIONS[qtype], answer=str(n),
                caption=f"{n} shape" + ("s" if n > 1 else ""))
  if qtype == "position":
    _, region, other_region, target, other = params
    del other_region, other  # the caption names the target only: short rows
    return dict(question=QUESTIONS[qtype].format(color=COLOR_NAMES[target[1]]),
                answer=POSITIONS[region],
                caption=f"{name(target)} at the {POSITIONS[region]}")
  word = WORDS[params[1]]
  return dict(question=QUESTIONS[qtype], answer=word, caption=f'the word "{word}"')


def turn_texts(params: tuple, style: str) -> tuple[str, str]:
  """(human text, gpt text) of a scene for style 'vqa' or 'caption'."""
  text = describe(params)
  if style == "caption":
    return "<image>\n" + CAPTION_PROMPT, text["caption"]
  return "<image>\n" + text["question"], text["answer"]


def all_turn_texts(question_types: Sequence[str] = QUESTION_TYPES,
                   style: str = "vqa") -> list[tuple[str, str]]:
  """Every (human text, gpt text) pair the generator can produce: the finite set a
  pipeline checks against max_length once, instead of scanning examples."""
  item = lambda shape, color: (shape, color, 0, 0, 1, (0, 0, 0))
  scenes = []
  for qtype in question_types:
    if qtype in ("color", "shape"):
      scenes += [(qtype, item(s, c)) for s in range(len(SHAPES))
                 for c in range(len(COLORS))]
    elif qtype == "count":
      scenes += [(qtype, (item(0, 0),) * n) for n in range(1, 5)]
    elif qtype == "position":
      scenes += [(qtype, r, 0, item(s, c), item(0, 0)) for r in range(len(POSITIONS))
                 for s in range(len(SHAPES)) for c in range(len(COLORS))]
    elif qtype == "text":
      scenes += [(qtype, w, 10, 0, 0) for w in range(len(WORDS))]
  return sorted(set(turn_texts(scene, style) for scene in scenes))


class SyntheticVQA:
  """Random-access source of synthetic examples (grain RandomAccessDataSource protocol)."""

  def __init__(self, split: str, num: int, resolution: int, seed: int = 0,
               question_types: Sequence[str] = QUESTION_TYPES, style: str = "vqa"):
    if split not in SPLIT_IDS:
      raise ValueError(f"synthetic split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    unknown = sorted(set(question_types) - set(QUESTION_TYPES))
    if unknown or not question_types:
      raise ValueError(f"synthetic question_types {tuple(question_types)}: unknown "
                       f"{unknown}; known {QUESTION_TYPES}")
    if style not in ("vqa", "caption"):
      raise ValueError(f"synthetic style must be 'vqa' or 'caption', got {style!r}")
    if resolution < 16:
      raise ValueError(f"synthetic resolution must be >= 16, got {resolution}")
    self.split, self.num, self.resolution, self.seed = split, int(num), resolution, seed
    self.question_types, self.style = tuple(question_types), style

  def __len__(self) -> int:
    return self.num

  def __repr__(self):
    return (f"SyntheticVQA(split={self.split!r}, num={self.num}, "
            f"resolution={self.resolution}, seed={self.seed}, style={self.style!r})")

  def scene_params(self, index: int) -> tuple:
    """The integer parameter tuple of example `index` (always in this split's bucket)."""
    qtype = self.question_types[index % len(self.question_types)]
    rng = np.random.default_rng(
        np.random.SeedSequence([self.seed, SPLIT_IDS[self.split], index]))
    for _ in range(10_000):
      params = _draw_params(qtype, rng, self.resolution)
      if scene_split(params) == self.split:
        return params
    raise RuntimeError(f"no {self.split} scene found for index {index}")  # unreachable

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num:
      raise IndexError(f"synthetic {self.split} index {index} out of range [0, {self.num})")
    params = self.scene_params(index)
    text = describe(params)
    human, gpt = turn_texts(params, self.style)
    return {
        "id": f"synthetic-{self.split}-{self.seed}-{index:07d}",
        "image": render(params, self.resolution),
        "conversations": [{"from": "human", "value": human},
                          {"from": "gpt", "value": gpt}],
        "question_type": params[0],
        "answer": gpt,  # the reference: the short answer, or the caption in style 'caption'
        "vqa_answer": text["answer"],
        "caption": text["caption"],
    }


def export(out_dir: str, split: str, num: int, resolution: int, seed: int = 0,
           question_types: Sequence[str] = QUESTION_TYPES, style: str = "vqa") -> str:
  """Writes `out_dir/images/<id>.png` and `out_dir/<split>.json`; returns the JSON path.

  Records carry `image` relative to `out_dir` (use it as the image root) and, beyond the
  LLaVA fields, `question_type` and `answer` for evaluation.
  """
  source = SyntheticVQA(split, num, resolution, seed, question_types, style)
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  records = []
  for index in range(len(source)):
    example = source[index]
    image_rel = f"images/{example['id']}.png"
    Image.fromarray(example["image"]).save(os.path.join(out_dir, image_rel))
    records.append({"id": example["id"], "image": image_rel,
                    "conversations": example["conversations"],
                    "question_type": example["question_type"],
                    "answer": example["answer"]})
  json_path = os.path.join(out_dir, f"{split}.json")
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump(records, f, indent=1)
  return json_path


def main(argv: Sequence[str] | None = None):
  parser = argparse.ArgumentParser(
      description="Export the synthetic VQA dataset as LLaVA JSON + PNG files.")
  parser.add_argument("--out", required=True, help="output folder (also the image root)")
  parser.add_argument("--split", default="train", choices=sorted(SPLIT_IDS))
  parser.add_argument("--num", type=int, default=1000)
  parser.add_argument("--resolution", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--style", default="vqa", choices=("vqa", "caption"))
  parser.add_argument("--question_types", default=",".join(QUESTION_TYPES),
                      help="comma-separated subset of " + ",".join(QUESTION_TYPES))
  args = parser.parse_args(argv)
  types = tuple(t for t in args.question_types.split(",") if t)
  path = export(args.out, args.split, args.num, args.resolution, args.seed, types, args.style)
  print(f"wrote {args.num} {args.split} examples to {path}")


if __name__ == "__main__":
  main()
