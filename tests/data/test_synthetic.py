"""Synthetic VQA: determinism, disjoint splits, answers that match the pixels, export."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from leo_mini_jax.data import synthetic

R = 48
PALETTE = np.array(list(synthetic.COLORS.values()), np.float32)


def foreground(image):
  return np.abs(image.astype(np.int32) - synthetic.BACKGROUND).sum(-1) > 60


def nearest_colour(pixels):
  d = ((pixels[:, None, :].astype(np.float32) - PALETTE[None]) ** 2).sum(-1)
  return d.argmin(-1)


def components(mask):
  """Number of 8-connected components (a small flood fill, independent of the code)."""
  seen = np.zeros_like(mask)
  count = 0
  for y, x in zip(*np.nonzero(mask)):
    if seen[y, x]:
      continue
    count += 1
    stack = [(y, x)]
    seen[y, x] = True
    while stack:
      cy, cx = stack.pop()
      for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
          ny, nx = cy + dy, cx + dx
          if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] \
              and not seen[ny, nx]:
            seen[ny, nx] = True
            stack.append((ny, nx))
  return count


def test_same_seed_same_bytes_other_seed_other_bytes():
  a = synthetic.SyntheticVQA("train", 10, R, seed=3)
  b = synthetic.SyntheticVQA("train", 10, R, seed=3)
  c = synthetic.SyntheticVQA("train", 10, R, seed=4)
  for i in range(10):
    ea, eb = a[i], b[i]
    assert ea["image"].tobytes() == eb["image"].tobytes()
    assert ea["conversations"] == eb["conversations"] and ea["id"] == eb["id"]
  assert any(a[i]["image"].tobytes() != c[i]["image"].tobytes() for i in range(10))
  # Random access order does not matter.
  assert a[7]["image"].tobytes() == synthetic.SyntheticVQA("train", 10, R, 3)[7][
      "image"].tobytes()


def test_train_and_eval_are_disjoint():
  n = 300
  train = synthetic.SyntheticVQA("train", n, R)
  evals = synthetic.SyntheticVQA("eval", n, R)
  train_scenes = {train.scene_params(i)[1:] for i in range(n)}
  eval_scenes = {evals.scene_params(i)[1:] for i in range(n)}
  assert not train_scenes & eval_scenes
  assert all(synthetic.scene_split(train.scene_params(i)) == "train" for i in range(n))
  assert all(synthetic.scene_split(evals.scene_params(i)) == "eval" for i in range(n))
  train_images = {train[i]["image"].tobytes() for i in range(0, n, 3)}
  eval_images = {evals[i]["image"].tobytes() for i in range(0, n, 3)}
  assert not train_images & eval_images
  # Both splits see every colour and shape (held-out scenes, not held-out concepts).
  answers = {evals[i]["answer"] for i in range(0, n, 5)}
  assert set(synthetic.COLORS) <= answers


def test_answers_match_the_pixels():
  source = synthetic.SyntheticVQA("eval", 60, 64)
  seen_types = set()
  for i in range(len(source)):
    ex = source[i]
    image, answer, qtype = ex["image"], ex["answer"], ex["question_type"]
    seen_types.add(qtype)
    fg = foreground(image)
    assert ex["conversations"][0]["value"].startswith("<image>\n")
    assert ex["conversations"][1]["value"] == answer
    if qtype == "color":
      colours = nearest_colour(image[fg])
      assert synthetic.COLOR_NAMES[np.bincount(colours).argmax()] == answer
    elif qtype == "shape":
      ys, xs = np.nonzero(fg)
      box = fg[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
      fill = box.mean()
      h, w = box.shape
      top_heavy = box[: h // 2].mean() / box[h // 2:].mean()
      # A point 45% of the half-size off the centre on both axes: inside a diamond
      # (|x| + |y| < 1), between the arms of a cross (arms reach 1/3).
      off_axis = box[round(0.275 * (h - 1)), round(0.275 * (w - 1))]
      expected = {"square": fill > 0.9, "circle": 0.7 < fill < 0.85,
                  "triangle": fill < 0.65 and top_heavy < 0.6,
                  "diamond": fill < 0.65 and 0.8 < top_heavy < 1.25 and off_axis,
                  "cross": fill < 0.7 and 0.8 < top_heavy < 1.25 and not off_axis}
      assert expected[answer], (i, answer, fill, top_heavy)
    elif qtype == "count":
      assert components(fg) == int(answer)
    elif qtype == "position":
      colour = ex["conversations"][0]["value"].split("the ")[1].split(" shape")[0]
      ys, xs = np.nonzero(fg)
      target = nearest_colour(image[fg]) == synthetic.COLOR_NAMES.index(colour)
      cy, cx = ys[target].mean() / 64, xs[target].mean() / 64
      region = ("left" if cx < 0.35 else "right" if cx > 0.65 else
                "top" if cy < 0.35 else "bottom" if cy > 0.65 else "centre")
      assert region == answer
    elif qtype == "text":
      assert answer in synthetic.WORDS and fg.sum() > 20
  assert seen_types == set(synthetic.QUESTION_TYPES)


def test_caption_style_and_subsets():
  source = synthetic.SyntheticVQA("train", 8, R, question_types=("color", "position"),
                                  style="caption")
  for i in range(8):
    ex = source[i]
    assert ex["question_type"] == ("color", "position")[i % 2]
    assert ex["conversations"][1]["value"] == ex["caption"] == ex["answer"]
    assert ex["conversations"][0]["value"] == "<image>\n" + synthetic.CAPTION_PROMPT
  with pytest.raises(ValueError, match="unknown"):
    synthetic.SyntheticVQA("train", 8, R, question_types=("smell",))
  with pytest.raises(ValueError, match="split"):
    synthetic.SyntheticVQA("test", 8, R)


def test_all_turn_texts_cover_what_the_generator_produces():
  for style in ("vqa", "caption"):
    possible = set(synthetic.all_turn_texts(style=style))
    source = synthetic.SyntheticVQA("train", 50, R, style=style)
    for i in range(50):
      turns = source[i]["conversations"]
      assert (turns[0]["value"], turns[1]["value"]) in possible


def test_export_writes_llava_json_and_pngs(tmp_path):
  out = tmp_path / "synth"
  cmd = [sys.executable, "-m", "leo_mini_jax.data.synthetic", "--out", str(out),
         "--split", "eval", "--num", "6", "--resolution", str(R), "--seed", "2"]
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  subprocess.run(cmd, check=True, cwd=root, capture_output=True)
  records = json.loads((out / "eval.json").read_text())
  source = synthetic.SyntheticVQA("eval", 6, R, seed=2)
  assert len(records) == 6
  for i, record in enumerate(records):
    ex = source[i]
    assert record["id"] == ex["id"]
    assert record["conversations"] == ex["conversations"]
    assert record["answer"] == ex["answer"]
    assert record["question_type"] == ex["question_type"]
    pixels = np.asarray(Image.open(out / record["image"]).convert("RGB"))
    np.testing.assert_array_equal(pixels, ex["image"])
