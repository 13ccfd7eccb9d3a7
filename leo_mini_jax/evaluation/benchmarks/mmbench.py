"""MMBench (dev, en) with CircularEval: every question is asked once per rotation of its
options and counts only when all rotations are answered right.

llava:   MMBench/mmbench_dev_20230712.tsv (or any mmbench*.tsv: index, question, hint,
         A..D, answer, category, image as base64).
parquet: lmms-lab/MMBench 'en' dev shards (same columns, image embedded).
Writes the .xlsx the MMBench server takes (the unrotated rows with a 'prediction' column).
"""

import base64
import os

from leo_mini_jax.evaluation import scoring
from leo_mini_jax.evaluation.benchmarks import base
from leo_mini_jax.evaluation.benchmarks import xlsx

OPTION_COLUMNS = ("A", "B", "C", "D", "E", "F")


def _missing(value) -> bool:
  return value is None or (isinstance(value, float) and value != value) or str(
      value).strip().lower() in ("", "nan", "none")


@base.register
class MMBench(base.Benchmark):
  name, title = "mmbench", "MMBench"
  folders = ("MMBench", "mmbench")

  def _samples(self, row, image):
    options = [str(row[c]) for c in OPTION_COLUMNS if c in row and not _missing(row[c])]
    answer = base.letter_index(row["answer"], len(options))
    hint = "" if _missing(row.get("hint")) else str(row["hint"])
    index = str(row["index"])
    columns = {k: ("" if _missing(row.get(k)) else str(row[k]))
               for k in ("index", "question", "hint", *OPTION_COLUMNS[:len(options)],
                         "answer", "category", "l2-category", "L2-category", "split")
               if k in row}
    samples = []
    for shift in range(len(options)):
      rotated, rotated_answer = scoring.rotate_options(options, answer, shift)
      samples.append(base.choice_sample(
          f"{index}@{shift}", row["question"], rotated, rotated_answer, image, hint,
          str(row.get("category", "")), index=index, shift=shift,
          row=columns if shift == 0 else None))
    return samples

  def llava_records(self):
    path = self.first_existing(["mmbench_dev_20230712.tsv", "mmbench_dev*.tsv", "*.tsv"])
    for row in base.load_records(path):
      yield path, str(row.get("index")), lambda row=row: self._samples(
          row, base64.b64decode(row["image"]))

  def parquet_sample(self, row):
    return self._samples(row, base.image_value(row["image"]))

  def score(self, records):
    groups = {}
    for r in records:
      groups.setdefault(r["target"]["index"], []).append(base.choice_correct(r))
    single = [r for r in records if r["target"]["shift"] == 0]
    return {"score": 100.0 * scoring.circular_accuracy(groups),
            "single_pass": base.accuracy_by(single, base.choice_correct,
                                            lambda r: r["target"]["category"]),
            "num_questions": len(groups)}

  def write_submission(self, records, out_dir):
    rows = []
    for r in records:
      if r["target"]["shift"] == 0:
        t = r["target"]
        letter = scoring.extract_choice(r["prediction"], len(t["options"]), t["options"])
        rows.append({**t["row"], "prediction": letter or r["prediction"]})
    if not rows:
      return []
    header = list(dict.fromkeys(k for row in rows for k in row))
    path = os.path.join(out_dir, "mmbench_dev_en_submission.xlsx")
    xlsx.write_xlsx(path, header, [[row.get(k, "") for k in header] for row in rows])
    return [path]
