"""Tiny benchmark folders in both on-disk layouts, written by the tests themselves.

`write(root, name, layout)` writes benchmark `name` under root/<its folder> with a few
records (PNG images) as LLaVA's eval folder ('llava': playground/data/eval/<name> as
LLaVA's scripts/v1_5/eval/*.sh and docs/Evaluation.md lay it out) or as an lmms-lab
parquet export ('parquet'), and returns `perfect`: a prediction per sample id that the
reference rule scores as right, so a reader + scorer round trip can be checked exactly.
The files follow the released layouts (ids as the releases number them), not our readers.
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


def _mme(root, layout, deeper=False):
  """MME's release: a subtask is either images + same-named .txt side by side, or
  images/ + questions_answers_YN/ (artwork, celebrity, landmark, posters, scene); each
  .txt holds two `question<TAB>answer` lines."""
  d = os.path.join(root, "MME")
  qa = [("existence", "1.png", [("Is there red? Please answer yes or no.", "Yes"),
                                ("Is there blue? Please answer yes or no.", "No")]),
        ("code_reasoning", "2.png", [("Does it print 3? Please answer yes or no.", "Yes"),
                                     ("Does it print 4? Please answer yes or no.", "No")]),
        ("artwork", "3.jpg", [("Is it by Monet? Please answer yes or no.", "No"),
                              ("Is it by Turner? Please answer yes or no.", "Yes")])]
  perfect, rows = {}, []
  release = os.path.join(d, "MME_Benchmark_release_version")
  if deeper:
    release = os.path.join(release, "MME_Benchmark")
  for task, image, pairs in qa:
    for k, (q, a) in enumerate(pairs):
      perfect[f"{task}/{image}#{k}"] = a
      rows.append({"question_id": f"{task}/{image}", "image": _img(k), "question": q,
                   "answer": a, "category": task})
    if layout == "llava":
      txt = "".join(f"{q}\t{a}\n" for q, a in pairs)
      stem = image.rsplit(".", 1)[0]
      if task == "artwork":
        _file(os.path.join(release, task, "images", image), png(1))
        _file(os.path.join(release, task, "questions_answers_YN", stem + ".txt"), txt)
      else:
        _file(os.path.join(release, task, image), png(1))
        _file(os.path.join(release, task, stem + ".txt"), txt)
  if layout == "parquet":
    _parquet(os.path.join(d, "data", "test-00000-of-00004.parquet"), rows)
  return perfect


def _mmbench_rows(options_per_question, answers, lang="en"):
  """The released dev file's rows: each question (index i) and its circular copies
  (index i + k·1,000,000, options rotated left by k, the answer letter following)."""
  rows = []
  for i, (options, answer) in enumerate(zip(options_per_question, answers)):
    n = len(options)
    for k in range(n):
      rotated = [options[(j + k) % n] for j in range(n)]
      row = {"index": i + k * 1_000_000, "question": f"Which is shown {i}?",
             "hint": "A hint." if i else None, "answer": "ABCD"[(answer - k) % n],
             "category": f"cat{i}", "source": "fixture", "l2-category": "l2",
             "comment": None, "split": "dev"}
      row.update({c: (rotated[j] if j < n else None) for j, c in enumerate("ABCD")})
      if lang == "cn":
        row["question"] = f"图中是什么 {i}?"
      rows.append(row)
  return rows


MMBENCH_OPTIONS = [OPTIONS[0], OPTIONS[1][:3]]  # question 1 has three options


def _mmbench_tsv(path, rows):
  header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
            "image", "source", "l2-category", "comment", "split"]
  lines = ["\t".join(header)]
  for r in rows:
    r = dict(r, image=base64.b64encode(png(r["index"] % 1_000_000)).decode())
    lines.append("\t".join("" if r[k] is None else str(r[k]) for k in header))
  _file(path, "\n".join(lines) + "\n")


def _mmbench(root, layout):
  rows = _mmbench_rows(MMBENCH_OPTIONS, [1, 1])
  perfect = {str(r["index"]): r["answer"] for r in rows}
  if layout == "llava":
    _mmbench_tsv(os.path.join(root, "mmbench", "mmbench_dev_20230712.tsv"), rows)
  else:
    _parquet(os.path.join(root, "MMBench", "en", "dev-00000-of-00001.parquet"),
             [dict(r, image=_img(r["index"] % 1_000_000), **{"L2-category": "l2"})
              for r in rows])
  return perfect


def _seed(root, layout):
  rows = [{"answer": "C", "choice_a": o[0], "choice_b": o[1], "choice_c": o[2],
           "choice_d": o[3], "data_id": f"{1454426 + i}_2591111986.jpg",
           "data_type": "image", "question": f"What is it {i}?",
           "question_id": str(101669 + i), "question_type_id": 5}
          for i, o in enumerate(OPTIONS)]
  rows.append(dict(rows[0], question_id="v1", data_type="video",
                   data_id="v1310_clip.mp4", question_type_id=10))
  if layout == "llava":
    d = os.path.join(root, "seed_bench")  # LLaVA's folder (scripts/v1_5/eval/seed.sh)
    _file(os.path.join(d, "SEED-Bench.json"),
          {"question_type": {"Scene Understanding": 1, "Instances Counting": 5},
           "questions": rows})
    _jsonl(os.path.join(d, "llava-seed-bench.jsonl"),
           [{"image": f"SEED-Bench-image/{r['data_id']}", "text": r["question"],
             "category": "Instances Counting", "question_id": r["question_id"]}
            for r in rows[:2]])
    for i in range(2):
      _file(os.path.join(d, "SEED-Bench-image", rows[i]["data_id"]), png(i))
  else:
    _parquet(os.path.join(root, "SEED-Bench", "data", "test-00000-of-00001.parquet"),
             [dict(r, image=[_img(0)]) for r in rows])
  return {"101669": "C", "101670": "C. bird"}


def _gqa(root, layout):
  qs = [("20968379", "n288870", "Is it red?", "yes"), ("20968380", "n288871", "What colour?",
                                                         "green")]
  if layout == "llava":
    d = os.path.join(root, "gqa")  # LLaVA: gqa/llava_gqa_testdev_balanced.jsonl, gqa/data/
    _jsonl(os.path.join(d, "llava_gqa_testdev_balanced.jsonl"),
           [{"question_id": q, "image": f"{im}.jpg",
             "text": f"{t}\nAnswer the question using a single word or phrase.",
             "category": "default"} for q, im, t, _ in qs])
    _file(os.path.join(d, "data", "testdev_balanced_questions.json"),
          {q: {"semantic": [], "entailed": [], "equivalent": [q], "question": t,
               "imageId": im, "isBalanced": True, "answer": a, "fullAnswer": a}
           for q, im, t, a in qs})
    for i, (_, im, _, _) in enumerate(qs):
      _file(os.path.join(d, "data", "images", f"{im}.jpg"), png(i))
  else:
    d = os.path.join(root, "GQA")
    _parquet(os.path.join(d, "testdev_balanced_instructions", "testdev-00000.parquet"),
             [{"id": q, "imageId": im, "question": t, "answer": a} for q, im, t, a in qs])
    _parquet(os.path.join(d, "testdev_balanced_images", "testdev-00000.parquet"),
             [{"id": im, "image": _img(i)} for i, (_, im, _, _) in enumerate(qs)])
  return {"20968379": "Yes.", "20968380": "green"}


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


POPE_QUESTIONS = [("adversarial", "yes"), ("adversarial", "no"), ("popular", "yes"),
                  ("random", "no"), ("random", "yes"), ("adversarial", "yes")]


def _pope(root, layout):
  """LLaVA's pope/: llava_pope_test.jsonl numbers question ids across the whole file;
  each coco/coco_pope_<split>.json numbers its own from 1 (same questions, same order)."""
  qs = [(split, i + 1, label) for i, (split, label) in enumerate(POPE_QUESTIONS)]
  text = lambda q: f"Is there a thing {q} in the image?"
  if layout == "llava":
    d = os.path.join(root, "pope")
    _jsonl(os.path.join(d, "llava_pope_test.jsonl"),
           [{"question_id": q, "image": f"COCO_val2014_{q:012d}.jpg",
             "text": text(q) + "\nAnswer the question using a single word or phrase.",
             "category": s} for s, q, _ in qs])
    for split in ("adversarial", "popular", "random"):
      own = [(q, a) for s, q, a in qs if s == split]
      _jsonl(os.path.join(d, "coco", f"coco_pope_{split}.json"),
             [{"question_id": k + 1, "image": f"COCO_val2014_{q:012d}.jpg", "text": text(q),
               "label": a} for k, (q, a) in enumerate(own)])
    for _, q, _ in qs:
      _file(os.path.join(d, "val2014", f"COCO_val2014_{q:012d}.jpg"), png(q))
  else:
    _parquet(os.path.join(root, "POPE", "data", "test-00000.parquet"),
             [{"question_id": str(q), "question": text(q), "answer": a, "category": s,
               "image": _img(q)} for s, q, a in qs])
  return {str(q): a.capitalize() for _, q, a in qs}


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
          [{"image": f"VizWiz_val_{i}.jpg", "question": f"what is this {i}?",
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


TEXTVQA = [  # (question_id, image id, question, ocr tokens, answers): two on one image
    (34602, "003a8ae2ef43b901", "what does it say?", ["stop", "sign"], ["stop"] * 10),
    (34603, "003a8ae2ef43b901", "how many words?", ["stop", "sign"],
     ["two"] * 3 + ["2"] * 7),
    (34604, "0054c91397f2fe05", "what brand is it?", [], ["nokia"] * 10)]


def _textvqa(root, layout, test=False):
  """LLaVA's llava_textvqa_val_v051_ocr.jsonl: question_id is the image id, text is the
  question, its reference OCR tokens and the instruction; TextVQA_0.5.1_val.json holds
  the answers under the real question ids."""
  if layout == "llava":
    d = os.path.join(root, "textvqa")
    _jsonl(os.path.join(d, "llava_textvqa_val_v051_ocr.jsonl"),
           [{"question_id": im, "image": f"{im}.jpg",
             "text": f"{q}\nReference OCR token: {', '.join(ocr)}\n"
                     "Answer the question using a single word or phrase."}
            for _, im, q, ocr, _ in TEXTVQA])
    _file(os.path.join(d, "TextVQA_0.5.1_val.json"),
          {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
           "data": [{"question": q, "image_id": im, "image_classes": ["Sign"],
                     "image_width": 32, "image_height": 24, "answers": a,
                     "question_tokens": q.split(), "question_id": qid, "set_name": "val"}
                    for qid, im, q, _, a in TEXTVQA]})
    for i, im in enumerate(dict.fromkeys(t[1] for t in TEXTVQA)):
      _file(os.path.join(d, "train_images", f"{im}.jpg"), png(i))
  else:
    d = os.path.join(root, "TextVQA", "data")
    row = lambda qid, im, q, ocr, a, i: {
        "image_id": im, "question_id": qid, "question": q, "question_tokens": q.split(),
        "image": _img(i), "image_width": 32, "image_height": 24, "answers": a,
        "ocr_tokens": ocr, "set_name": "val" if a else "test"}
    _parquet(os.path.join(d, "validation-00000-of-00001.parquet"),
             [row(*t, i) for i, t in enumerate(TEXTVQA)])
    _parquet(os.path.join(d, "test-00000-of-00001.parquet"),
             [row(40000, "0a0bc91825468c45", "what team?", ["lions"], None, 3)])
    _parquet(os.path.join(d, "train-00000-of-00001.parquet"),
             [row(1, "0b0bc91825468c45", "what?", ["x"], ["x"] * 10, 2)])
  return {"34602": "STOP", "34603": "2", "34604": "Nokia."}


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
