"""Answer rules of the lmms-eval tasks the paper's numbers come from (EAGLE runs its
benchmarks through lmms-eval), where they differ from the benchmarks' own scripts.

Each function names the task file whose rule it follows; `scoring` holds the rules that
lmms-eval shares with the official scripts.
"""

import string
from typing import Mapping, Sequence

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, target: str) -> bool:
  """lmms-eval's `exact_match` with ignore_case and ignore_punctuation (Hugging Face
  evaluate's metric; AI2D, GQA): both lower-cased, ASCII punctuation deleted, equal."""
  return prediction.lower().translate(_PUNCTUATION) == target.lower().translate(_PUNCTUATION)


def sqa_correct(prediction: str, letter: str) -> bool:
  """scienceqa/utils.py `sqa_process_results`: the prediction is the letter itself, or
  starts with a capital letter followed by '.' ("B. dog") naming it."""
  if prediction == letter:
    return True
  return len(prediction) >= 2 and prediction[0].isupper() and prediction[1] == "." and (
      prediction[0] == letter)


def seed_letter(prediction: str) -> str:
  """seedbench/utils.py `seed_process_result`: the stripped prediction's first character."""
  return prediction.strip()[:1]


def mmbench_infer(answer: str, options: Mapping[str, str]) -> str | None:
  """MMBench's `can_infer` (mmbench/mmbench_evals.py): the option letter an answer names,
  or None. lmms-eval asks a GPT judge when this finds none; without one, such an answer
  counts as wrong.

  First a letter standing alone among the space-split words, when exactly one of A–E does
  (a lone 'A' in an answer of more than 3 words may be the article, so it goes on), then
  exactly one letter written as 'B.', 'B,', 'B:', 'B)', 'B).', '(B)', '(B).', ':B', ':B,',
  ':B.', ':B)' or ':B).'; else the one option whose text the lower-cased answer contains.
  """
  letters = "ABCDE"
  words = [w.strip() for w in answer.split()]
  count = lambda prefix, suffix: sum(prefix + c + suffix in words for c in letters)
  if count("", "") == 1:
    for letter in letters:
      if "A" in words and len(words) > 3:
        break
      if letter in words:
        return letter
  forms = [("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
           (":", ""), (":", ","), (":", "."), (":", ")"), (":", ").")]
  for prefix, suffix in forms:
    if count(prefix, suffix) == 1:
      for letter in letters:
        if prefix + letter + suffix in words:
          return letter
  lowered = answer.lower()
  hits = [k for k, text in options.items() if str(text).lower() in lowered]
  return hits[0] if len(hits) == 1 else None


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
  """pope/utils.py: accuracy = the lower-cased, stripped prediction equals the label;
  precision / recall count predictions that are exactly 'yes' / 'no' ("Yes, there is"
  is neither); yes_ratio is the share of 'yes' labels, as lmms-eval writes it."""
  if len(predictions) != len(labels):
    raise ValueError(f"pope_metrics: {len(predictions)} predictions, {len(labels)} labels")
  if not labels:
    raise ValueError("pope_metrics: no questions")
  pred = [p.lower().strip() for p in predictions]
  gold = [str(l).lower().strip() for l in labels]
  pairs = list(zip(pred, gold))
  tp = pairs.count(("yes", "yes"))
  fp = pairs.count(("yes", "no"))
  fn = pairs.count(("no", "yes"))
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  answered = gold.count("yes") + gold.count("no")
  return {"accuracy": sum(p == g for p, g in pairs) / len(pairs), "precision": precision,
          "recall": recall, "f1": f1,
          "yes_ratio": gold.count("yes") / answered if answered else 0.0}
