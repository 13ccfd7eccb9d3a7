"""Tiny benchmark folders in both on-disk layouts, written by the tests themselves.

`write(root, name, layout)` writes benchmark `name` under root/<its folder> with a few
records (PNG images) as LLaVA's eval folder ('llava') or as an lmms-lab parquet export
('parquet'), and returns `perfect`: a prediction per sample id that the official rule
scores as right, so a reader + scorer round trip can be checked exactly.
"""

import base64
import io
import json
import os

import numpy as np
from PIL import Image

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 20)]


def png(index: int, size: int = 24) -> bytes:
  image = np.zeros((size, size + 8, 3), np.uint8)
  image[:] = COLOURS[index % len(COLOURS)]
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def _file(path: str, data) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if isinstance(data, bytes):
    with open(path, "wb") as f:
      f.write(data)
  elif isinstance(data, str):
    with open(path, "w") as f:
      f.write(data)
  else:
    with open(path, "w") as f:
      json.dump(data, f)


def _jsonl(path: str, rows) -> None:
  _file(path, "".join(json.dumps(r) + "\n" for r in rows))


def _parquet(path: str, rows) -> None:
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), path)


def _img(index: int) -> dict:
  return {"bytes": png(index), "path": f"{index}.png"}


OPTIONS = [["red", "green", "blue", "yellow"], ["cat", "dog", "bird", "fish"]]


def write(root: str, name: str, layout: str) -> dict[str, str]:
  """Writes the fixture; returns {sample id: a prediction scored as correct}."""
  return globals()[f"_{name}"](root, layout)


def _mme(root, layout):
  d = os.path.join(root, "MME")
  qa = [("existence", "1.png", [("Is there red? Please answer yes or no.", "Yes"),
                                ("Is there blue? Please answer yes or no.", "No")]),
        ("code_reasoning", "2.png", [("Does it print 3? Please answer yes or no.", "Yes"),
                                     ("Does it print 4? Please answer yes or no.", "No")])]
  perfect, rows = {}, []
  for task, image, pairs in qa:
    for k, (q, a) in enumerate(pairs):
      perfect[f"{task}/{image}#{k}"] = a
      rows.append({"question_id": image, "image": _img(k), "question": q, "answer": a,
                   "category": task})
    if layout == "llava":
      base = os.path.join(d, "MME_Benchmark_release_version", task)
      _file(os.path.join(base, image), png(1))
      _file(os.path.join(base, image.replace(".png", ".txt")),
            "".join(f"{q}\t{a}\n" for q, a in pairs))
  if layout == "parquet":
    _parquet(os.path.join(d, "data", "test-00000-of-00001.parquet"), rows)
  return perfect


def _mmbench(root, layout):
  d = os.path.join(root, "MMBench")
  rows = [{"index": i, "question": f"Which is shown {i}?", "hint": "A hint." if i else None,
           "A": o[0], "B": o[1], "C": o[2], "D": o[3], "answer": "B", "category": "cat",
           "l2-category": "l2", "split": "dev"} for i, o in enumerate(OPTIONS)]
  perfect = {}
  for i, o in enumerate(OPTIONS):
    for shift in range(4):
      perfect[f"{i}@{shift}"] = "ABCD"[(1 - shift) % 4]
  if layout == "llava":
    header = list(rows[0]) + ["image"]
    lines = ["\t".join(header)]
    for i, r in enumerate(rows):
      r = dict(r, image=base64.b64encode(png(i)).decode())
      lines.append("\t".join("" if r[k] is None else str(r[k]) for k in header))
    _file(os.path.join(d, "mmbench_dev_20230712.tsv"), "\n".join(lines) + "\n")
  else:
    _parquet(os.path.join(d, "en", "dev-00000-of-00001.parquet"),
             [dict(r, image=_img(i)) for i, r in enumerate(rows)])
  return perfect


def _seed(root, layout):
  d = os.path.join(root, "SEED-Bench")
  rows = [{"question_id": str(i), "question": f"What is it {i}?", "choice_a": o[0],
           "choice_b": o[1], "choice_c": o[2], "choice_d": o[3], "answer": "C",
           "data_id": f"{i}.png", "data_type": "image", "question_type_id": 1}
          for i, o in enumerate(OPTIONS)]
  rows.append(dict(rows[0], question_id="video", data_type="video", data_id="v.mp4"))
  if layout == "llava":
    _file(os.path.join(d, "SEED-Bench.json"), {"questions": rows})
    for i in range(2):
      _file(os.path.join(d, "SEED-Bench-image", f"{i}.png"), png(i))
  else:
    _parquet(os.path.join(d, "data", "test.parquet"),
             [dict(r, image=[_img(0)]) for r in rows])
  return {"0": "C", "1": "(C) bird"}


def _gqa(root, layout):
  d = os.path.join(root, "GQA")
  qs = [("q1", "img1", "Is it red?", "yes"), ("q2", "img2", "What colour?", "green")]
  if layout == "llava":
    _jsonl(os.path.join(d, "llava_gqa_testdev_balanced.jsonl"),
           [{"question_id": q, "image": f"{im}.jpg", "text": t} for q, im, t, _ in qs])
    _file(os.path.join(d, "testdev_balanced_questions.json"),
          {q: {"answer": a, "imageId": im} for q, im, _, a in qs})
    for i, (_, im, _, _) in enumerate(qs):
      _file(os.path.join(d, "images", f"{im}.jpg"), png(i))
  else:
    _parquet(os.path.join(d, "testdev_balanced_instructions", "testdev-00000.parquet"),
             [{"id": q, "imageId": im, "question": t, "answer": a} for q, im, t, a in qs])
    _parquet(os.path.join(d, "testdev_balanced_images", "testdev-00000.parquet"),
             [{"id": im, "image": _img(i)} for i, (_, im, _, _) in enumerate(qs)])
  return {"q1": "Yes.", "q2": "green"}


def _sqa(root, layout):
  d = os.path.join(root, "ScienceQA")
  problems = {
      "10": {"question": "Which is a mammal?", "choices": ["frog", "dog"], "answer": 1,
             "hint": "Animals.", "image": "image.png", "split": "test", "subject": "bio"},
      "11": {"question": "Which is hot?", "choices": ["ice", "fire", "snow"], "answer": 1,
             "hint": "", "image": None, "split": "test", "subject": "phys"},
      "12": {"question": "Which is red?", "choices": ["sky", "blood"], "answer": 1,
             "hint": "", "image": "image.png", "split": "test", "subject": "phys"}}
  if layout == "llava":
    _file(os.path.join(d, "problems.json"), problems)
    _file(os.path.join(d, "pid_splits.json"), {"test": list(problems)})
    for pid in ("10", "12"):
      _file(os.path.join(d, "images", "test", pid, "image.png"), png(int(pid)))
    return {"10": "B", "12": "B"}
  _parquet(os.path.join(d, "ScienceQA-IMG", "test-00000.parquet"),
           [dict({k: v for k, v in p.items() if k != "split"}, id=pid,
                 image=_img(0) if p["image"] else None) for pid, p in problems.items()])
  return {"10": "B", "12": "B"}


def _mmmu(root, layout):
  d = os.path.join(root, "MMMU")
  rows = [{"id": "validation_Art_1", "question": "<image 1> Which colour?",
           "options": str(OPTIONS[0]), "answer": "B", "question_type": "multiple-choice",
           "subfield": "Art"},
          {"id": "validation_Math_2", "question": "What is 2+2? <image 1>", "options": "[]",
           "answer": "4", "question_type": "open", "subfield": "Math"}]
  if layout == "llava":
    _jsonl(os.path.join(d, "mmmu_val.jsonl"), [dict(r, image_1=f"img/{i}.png")
                                               for i, r in enumerate(rows)])
    for i in range(2):
      _file(os.path.join(d, "img", f"{i}.png"), png(i))
  else:
    _parquet(os.path.join(d, "validation-00000.parquet"),
             [dict(r, image_1=_img(i), image_2=None) for i, r in enumerate(rows)])
  return {"validation_Art_1": "(B)", "validation_Math_2": "The answer is 4."}


def _pope(root, layout):
  d = os.path.join(root, "POPE")
  qs = [("adversarial", 1, "yes"), ("adversarial", 2, "no"), ("popular", 3, "yes"),
        ("random", 4, "no"), ("random", 5, "yes")]
  if layout == "llava":
    _jsonl(os.path.join(d, "llava_pope_test.jsonl"),
           [{"question_id": q, "image": f"{q}.jpg", "text": f"Is there a thing {q}?",
             "category": s} for s, q, _ in qs])
    for split in ("adversarial", "popular", "random"):
      _jsonl(os.path.join(d, "coco", f"coco_pope_{split}.json"),
             [{"question_id": q, "label": a} for s, q, a in qs if s == split])
    for _, q, _ in qs:
      _file(os.path.join(d, "val2014", f"{q}.jpg"), png(q))
  else:
    _parquet(os.path.join(d, "data", "test-00000.parquet"),
             [{"question_id": str(q), "question": f"Is there a thing {q}?", "answer": a,
               "category": s, "image": _img(q)} for s, q, a in qs])
  return {f"{s}/{q}": ("Yes, there is." if a == "yes" else "No.") for s, q, a in qs}


def _ai2d(root, layout):
  d = os.path.join(root, "AI2D")
  rows = [{"question": "Which part?", "options": OPTIONS[0], "answer": "3"},
          {"question": "Which animal?", "options": OPTIONS[1], "answer": "0"}]
  if layout == "llava":
    _jsonl(os.path.join(d, "ai2d_test.jsonl"), [dict(r, image=f"images/{i}.png")
                                                for i, r in enumerate(rows)])
    for i in range(2):
      _file(os.path.join(d, "images", f"{i}.png"), png(i))
  else:
    _parquet(os.path.join(d, "data", "test-00000.parquet"),
             [dict(r, image=_img(i)) for i, r in enumerate(rows)])
  return {"0": "D", "1": "A"}


def _vizwiz(root, layout):
  d = os.path.join(root, "VizWiz")
  answers = [["unanswerable"] * 10, ["dont know"] * 4 + ["soup"] * 6]
  if layout == "llava":
    _file(os.path.join(d, "Annotations", "val.json"),
          [{"image": f"VizWiz_val_{i}.jpg", "question": f"What is this {i}?",
            "answers": [{"answer": a, "answer_confidence": "yes"} for a in ans]}
           for i, ans in enumerate(answers)])
    for i in range(2):
      _file(os.path.join(d, "val", f"VizWiz_val_{i}.jpg"), png(i))
    return {"VizWiz_val_0.jpg": "Unanswerable", "VizWiz_val_1.jpg": "Soup."}
  _parquet(os.path.join(d, "val-00000.parquet"),
           [{"question_id": f"VizWiz_val_{i}.jpg", "question": f"What is this {i}?",
             "answers": ans, "image": _img(i)} for i, ans in enumerate(answers)]
           + [{"question_id": "VizWiz_test_9.jpg", "question": "And this?", "answers": None,
               "image": _img(3)}])
  return {"VizWiz_val_0.jpg": "Unanswerable", "VizWiz_val_1.jpg": "Soup."}


def _textvqa(root, layout):
  d = os.path.join(root, "TextVQA")
  answers = [["stop"] * 10, ["two"] * 3 + ["2"] * 7]
  if layout == "llava":
    _jsonl(os.path.join(d, "llava_textvqa_val_v051_ocr.jsonl"),
           [{"question_id": 100 + i, "image": f"{i}.jpg",
             "text": f"What does it say {i}?\nReference OCR token: stop\n"
                     "Answer the question using a single word or phrase."}
            for i in range(2)])
    _file(os.path.join(d, "TextVQA_0.5.1_val.json"),
          {"data": [{"question_id": 100 + i, "answers": a} for i, a in enumerate(answers)]})
    for i in range(2):
      _file(os.path.join(d, "train_images", f"{i}.jpg"), png(i))
  else:
    _parquet(os.path.join(d, "validation-00000.parquet"),
             [{"question_id": 100 + i, "question": f"What does it say {i}?", "answers": a,
               "image": _img(i)} for i, a in enumerate(answers)])
  return {"100": "STOP", "101": "2"}


def _docvqa(root, layout):
  d = os.path.join(root, "DocVQA")
  rows = [{"questionId": 7, "question": "What is the date?", "answers": ["1986", "1986."]},
          {"questionId": 8, "question": "Who signed?", "answers": ["J. Smith"]}]
  if layout == "llava":
    _file(os.path.join(d, "val", "val_v1.0.json"),
          {"data": [dict(r, image=f"documents/{i}.png") for i, r in enumerate(rows)]})
    for i in range(2):
      _file(os.path.join(d, "val", "documents", f"{i}.png"), png(i))
  else:
    _parquet(os.path.join(d, "DocVQA", "validation-00000.parquet"),
             [dict(r, image=_img(i)) for i, r in enumerate(rows)])
  return {"7": "1986", "8": "j. smith"}


def _chartqa(root, layout):
  d = os.path.join(root, "ChartQA")
  rows = [("human", "How many?", "10"), ("augmented", "What share?", "12%")]
  if layout == "llava":
    for i, (kind, q, a) in enumerate(rows):
      _file(os.path.join(d, "test", f"test_{kind}.json"),
            [{"imgname": f"{i}.png", "query": q, "label": a}])
      _file(os.path.join(d, "test", "png", f"{i}.png"), png(i))
    return {"human/0": "10.3", "augmented/0": "0.12"}
  _parquet(os.path.join(d, "test-00000.parquet"),
           [{"type": f"{k}_test", "question": q, "answer": a, "image": _img(i)}
            for i, (k, q, a) in enumerate(rows)])
  return {"#0": "10.3", "#1": "0.12"}


def _ocrbench(root, layout):
  d = os.path.join(root, "OCRBench")
  rows = [("Regular Text Recognition", "what is written?", ["STOP"]),
          ("Handwritten Mathematical Expression Recognition", "write the formula",
           ["x^2"])]
  if layout == "llava":
    _file(os.path.join(d, "OCRBench.json"),
          [{"id": i, "dataset_name": "x", "question": q, "answers": a, "type": t,
            "image_path": f"./OCRBench_Images/{i}.png"} for i, (t, q, a) in enumerate(rows)])
    for i in range(2):
      _file(os.path.join(d, "OCRBench_Images", f"{i}.png"), png(i))
  else:
    _parquet(os.path.join(d, "test-00000.parquet"),
             [{"dataset": "x", "question": q, "question_type": t, "answer": a,
               "image": _img(i)} for i, (t, q, a) in enumerate(rows)])
  return {"0": "it says stop", "1": "x ^ 2"}
