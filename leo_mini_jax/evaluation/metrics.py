"""VQA-style answer metrics: normalised exact match, per question type, blind baseline."""

import collections
import re
import string
from typing import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def normalize_answer(text: str) -> str:
  """Lower-case, strip punctuation and articles, number words → digits, squeeze spaces."""
  text = text.lower().strip()
  text = text.translate(str.maketrans("", "", string.punctuation))
  text = _ARTICLES.sub(" ", text)
  return " ".join(_NUMBERS.get(word, word) for word in text.split())


def exact_match(prediction: str, reference: str) -> bool:
  return normalize_answer(prediction) == normalize_answer(reference)


def accuracy_by_type(predictions: Sequence[str], references: Sequence[str],
                     question_types: Sequence[str]) -> dict[str, float]:
  """{'overall': acc, '<type>': acc, ...} of normalised exact match."""
  hits: dict[str, list[bool]] = collections.defaultdict(list)
  for prediction, reference, qtype in zip(predictions, references, question_types):
    correct = exact_match(prediction, reference)
    hits["overall"].append(correct)
    hits[qtype or "none"].append(correct)
  return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def blind_baseline(references: Sequence[str], question_types: Sequence[str],
                   train_references: Iterable[tuple[str, str]] | None = None
                   ) -> dict[str, float]:
  """Accuracy of the best constant answer per question type (no image, no question text).

  The constant is the most frequent normalised answer of that type in
  `train_references` ((question_type, answer) pairs) when given, else in the evaluated
  references themselves (an upper bound for any blind constant).
  """
  source = list(train_references) if train_references is not None else list(
      zip(question_types, references))
  counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for qtype, answer in source:
    counts[qtype or "none"][normalize_answer(answer)] += 1
  constants = {qtype: counter.most_common(1)[0][0] for qtype, counter in counts.items()}
  predictions = [constants.get(qtype or "none", "") for qtype in question_types]
  return accuracy_by_type(predictions, references, question_types)
