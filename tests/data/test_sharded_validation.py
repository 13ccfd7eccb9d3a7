"""Each process checks only its shard of the records; an all-gather of the status table
gives every process the same kept records, counts and truncation decision."""

import json
import threading

import numpy as np

from leo_mini_jax.data import images
from leo_mini_jax.data import llava
from leo_mini_jax.data import synthetic
from leo_mini_jax.data import tokenizers as tokenizers_lib
from leo_mini_jax.data import conversation as conv


def _threaded_gather(count):
  """An all-gather between `count` threads standing in for processes."""
  barrier = threading.Barrier(count)
  tables = {}

  def gather_for(process):
    def gather(local):
      tables[process] = local
      barrier.wait()
      return np.stack([tables[p] for p in range(count)])
    return gather
  return gather_for


def test_each_process_opens_only_its_shard(tmp_path, monkeypatch):
  json_path = synthetic.export(str(tmp_path), "train", 41, 32, seed=2)
  records = json.loads(open(json_path).read())
  records[3]["image"] = "missing.png"
  records[8]["conversations"] = records[8]["conversations"][:1]
  records[21]["conversations"][1]["value"] = "long " * 40  # truncated at 96 tokens
  path = tmp_path / "sharded.json"
  path.write_text(json.dumps(records))
  check = llava.LengthCheck(tokenizers_lib.ByteTokenizer(),
                            conv.get_template("vicuna_v1", ""), 96, allow_truncation=True)
  opened = []
  real_problem = images.image_problem

  def counting_problem(source, *args, **kwargs):
    opened.append(source)
    return real_problem(source, *args, **kwargs)

  whole_source, whole = llava.load_llava(str(path), length_check=check)
  monkeypatch.setattr(images, "image_problem", counting_problem)
  gather_for = _threaded_gather(2)
  results = {}

  def run(process):
    results[process] = llava.validate_records(
        records, str(tmp_path), f"p{process}", length_check=check, shard=(process, 2),
        gather=gather_for(process), num_threads=1)

  threads = [threading.Thread(target=run, args=(p,), name=f"proc{p}") for p in (0, 1)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  for process in (0, 1):
    kept, report = results[process]
    assert report.num_checked == len(range(process, 41, 2))
    assert kept == [i for i in range(41) if i not in (3, 8)]
    assert report.reason_counts == whole.reason_counts == {"image_missing": 1,
                                                          "no_assistant_turn": 1}
    assert report.truncated == whole.truncated == [records[21]["id"]]
    assert report.lost_tokens == whole.lost_tokens
    assert report.length_needed == whole.length_needed
  assert len(whole_source) == 39 and whole.num_checked == 41
  # Between them the two processes opened each checked image once.
  assert len(opened) == len(set(opened)) == 41 - 1  # #8 fails before its image is checked
