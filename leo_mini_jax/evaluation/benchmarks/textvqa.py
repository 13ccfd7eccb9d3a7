"""TextVQA (val; test for the server): VQA accuracy over 10 annotators.

llava:   textvqa/llava_textvqa_val_v051_ocr.jsonl (question_id = the *image* id, shared by
         the questions on an image; image; text = question + reference OCR tokens +
         instruction) + answers in textvqa/TextVQA_0.5.1_val.json, joined as LLaVA's
         eval_textvqa.py does: on (image id, lower-cased question, the text's first line)
         + train_images/. With eval.split=test, TextVQA_0.5.1_test.json + test_images/.
parquet: lmms-lab/textvqa (question_id, image_id, question, answers, ocr_tokens, image);
         split 'validation' (default) or 'test'.
Prompt as lmms-eval's textvqa task: the capitalised question + "\nReference OCR token: "
+ the OCR tokens joined by ", " + the single-word instruction (LLaVA's jsonl text already
is this); 1024 new tokens (the harness default). Questions without answers go to
textvqa_test_submission.json ([{question_id, answer}], answers through the EvalAI
processor as lmms-eval writes them).
"""

import os

from leo_mini_jax.evaluation import scoring
from leo_mini_jax.evaluation.benchmarks import base


def prompt(question: str, ocr_tokens) -> str:
  """lmms-eval's textvqa_doc_to_text (with its default ocr=True)."""
  text = question.capitalize()
  if ocr_tokens is not None:
    text += "\nReference OCR token: " + ", ".join(str(t) for t in ocr_tokens)
  return text + "\n" + base.SINGLE_WORD


def question_of(text: str) -> str:
  """The lower-cased question inside a LLaVA prompt (eval_textvqa.py's prompt_processor):
  its first line, or the second when the OCR tokens come first."""
  lines = text.split("\n")
  first_is_ocr = lines[0].startswith("Reference OCR token:") and len(lines) == 3
  return (lines[1] if first_is_ocr else lines[0]).lower()


@base.register
class TextVQA(base.Benchmark):
  name, title = "textvqa", "TextVQA"
  column, max_new_tokens = 9, base.HARNESS_DEFAULT_LENGTH
  default_split = "validation"
  llava_files = ("llava_textvqa_val_v051_ocr.jsonl + TextVQA_0.5.1_val.json + "
                 "train_images/")

  def _sample(self, qid, text, answers, image):
    target = {"answers": [str(a) for a in answers]} if answers else {}
    return base.Sample(id=str(qid), prompt=text, image=image, target=target)

  def llava_records(self):
    if self.split == "test":
      path = self.require("TextVQA_0.5.1_test.json")
      image_dir = self.first_existing(["test_images", "images", "."])
      for r in base.load_records(path):
        yield path, str(r.get("question_id")), lambda r=r: self._sample(
            r["question_id"], prompt(r["question"], r.get("ocr_tokens")), None,
            os.path.join(image_dir, r["image_id"] + ".jpg"))
      return
    path = self.first_existing(["llava_textvqa_val_v051_ocr.jsonl", "llava_textvqa_val*.jsonl"])
    annotations = {}
    for a in base.load_records(self.require("TextVQA_0.5.1_val.json")):
      annotations[(str(a["image_id"]), a["question"].lower())] = a
    image_dir = self.first_existing(["train_images", "images", "."])
    for index, r in enumerate(base.load_records(path)):
      def build(r=r):
        key = (str(r["question_id"]), question_of(r["text"]))
        if key not in annotations:
          raise base.BenchmarkError(f"no annotation for image {key[0]!r} and question "
                                    f"{key[1]!r} in TextVQA_0.5.1_val.json")
        a = annotations[key]
        return self._sample(a["question_id"], r["text"], a.get("answers"),
                            os.path.join(image_dir, r["image"]))
      yield path, f"line {index + 1}", build

  def parquet_sample(self, row):
    return self._sample(row["question_id"], prompt(row["question"], row.get("ocr_tokens")),
                        row.get("answers"), base.image_value(row["image"]))

  def score(self, records):
    return base.score_vqa(records, scoring.vqa_accuracy)

  def write_submission(self, records, out_dir):
    rows = [{"question_id": _int_or_str(r["id"]),
             "answer": scoring.normalize_vqa_answer(r["prediction"])}
            for r in records if "answers" not in r["target"]]
    return base.write_json_submission(os.path.join(out_dir, "textvqa_test_submission.json"),
                                      rows)


def _int_or_str(value):
  return int(value) if str(value).isdigit() else value
