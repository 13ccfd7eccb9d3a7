"""The lmms-eval model (evaluation/lmms_eval_model.py) gives eval.py's answers.

eval.py's runner scores MME and POPE (LLaVA layout) on the session's trained run; the
adapter answers the same questions with the same images (as the PIL images lmms-eval's
`doc_to_visual` hands over), through lmms-eval's own `Instance` objects when lmms-eval is
installed (requirements-lmms.txt), else through the adapter's lmms-eval-free core.
"""

import copy
import json
import os
import shutil

from PIL import Image
import pytest

from leo_mini_jax.evaluation import benchmarks
from leo_mini_jax.evaluation import lmms_eval_model
from leo_mini_jax.evaluation import runner
from leo_mini_jax.training import loop
from tests.evaluation import benchmark_fixtures

NAMES = ("mme", "pope")
# The run's model (tests/conftest.py's small_config(3)) as lmms-eval's model_args give it.
CONFIG_SPEC = "configs/tiny.py:stage=3;steps=4;experts=clip"
MAX_NEW_TOKENS = 4


@pytest.fixture(scope="module")
def scored(stage3_run, tmp_path_factory):
  """(run dir, {benchmark: samples}, {benchmark: {id: eval.py's prediction}})."""
  root = tmp_path_factory.mktemp("lmms")
  run = str(root / "run")
  shutil.copytree(stage3_run.workdir, run)  # eval writes into the workdir
  data = str(root / "data")
  for name in NAMES:
    benchmark_fixtures.write(data, name, "llava")
  config = copy.deepcopy(stage3_run.config)
  config.eval.benchmark, config.eval.data_dir = ",".join(NAMES), data
  config.eval.max_new_tokens = MAX_NEW_TOKENS
  runner.evaluate(config, run, setup=loop.TrainSetup(config, stage3_run.mesh), verbose=False)
  samples, predictions = {}, {}
  for cls, folder in benchmarks.resolve(",".join(NAMES), data):
    samples[cls.name] = cls(folder).samples()
    with open(os.path.join(run, "eval", cls.name, "predictions.jsonl")) as f:
      predictions[cls.name] = {r["id"]: r["prediction"] for r in map(json.loads, f)}
  assert all(len(predictions[n]) == len(samples[n]) > 1 for n in NAMES)
  return run, samples, predictions


def _pil(sample):
  with Image.open(sample.image) as image:  # what lmms-eval tasks' doc_to_visual returns
    return image.convert("RGB")


def test_core_answers_as_eval_py(scored, stage3_run):
  run, samples, predictions = scored
  answerer = lmms_eval_model.build_answerer(run, CONFIG_SPEC, stage3_run.mesh,
                                            batch_size=8, max_new_tokens=MAX_NEW_TOKENS)
  for name in NAMES:
    questions = [s.prompt for s in samples[name]]
    answers = answerer.answer(questions, [_pil(s) for s in samples[name]])
    assert answers == [predictions[name][s.id] for s in samples[name]], name


def test_model_args_name_unknown_keys_and_fields(scored):
  run, _, _ = scored
  with pytest.raises(TypeError, match=r"unknown model_args \['temprature'\]"):
    lmms_eval_model.build_answerer(run, CONFIG_SPEC, temprature=0)
  with pytest.raises(KeyError, match=r"no field eval.max_new_token\b"):
    lmms_eval_model.build_answerer(run, CONFIG_SPEC, **{"eval.max_new_token": 3})
  with pytest.raises(FileNotFoundError, match="no config file configs/nope.py"):
    lmms_eval_model.build_answerer(run, "configs/nope.py:stage=3")


def test_cut_at_until():
  assert lmms_eval_model.cut_at("yes\n\nno", ["\n\n"]) == "yes"
  assert lmms_eval_model.cut_at("a.b", ["x", "."]) == "a"
  assert lmms_eval_model.cut_at("abc", []) == "abc"


def test_lmms_eval_instances_get_eval_py_answers(scored, stage3_run):
  pytest.importorskip("lmms_eval", reason="lmms-eval is optional (requirements-lmms.txt)")
  from lmms_eval.api.instance import Instance  # pylint: disable=import-outside-toplevel
  from lmms_eval.models.registry_v2 import ModelRegistryV2  # pylint: disable=import-outside-toplevel
  run, samples, predictions = scored
  registry = ModelRegistryV2()
  registry.register_manifest(lmms_eval_model.manifest())
  cls = registry.get_model_class(lmms_eval_model.MODEL_ID)  # checks lmms subclass, is_simple
  assert cls is lmms_eval_model.LeoMiniJax
  # as lmms-eval's evaluator builds it: model_args string + its --batch_size / --device
  model = cls.create_from_arg_string(
      f"run={run},config={CONFIG_SPEC},max_new_tokens={MAX_NEW_TOKENS}",
      {"batch_size": 8, "max_batch_size": None, "device": "cpu", "mesh": stage3_run.mesh})
  requests, expected = [], []
  for name in NAMES:
    model.task_dict[name] = {"test": samples[name]}
    gen_kwargs = {"until": ["\n\n"], "max_new_tokens": MAX_NEW_TOKENS, "temperature": 0}
    for doc_id, sample in enumerate(samples[name]):
      requests.append(Instance(
          request_type="generate_until",
          arguments=(sample.prompt, dict(gen_kwargs), lambda doc: [_pil(doc)], doc_id, name,
                     "test"),
          idx=0, metadata={"task": name, "doc_id": doc_id, "repeats": 1}))
      expected.append(predictions[name][sample.id])
  assert model.generate_until(requests) == expected
  with pytest.raises(NotImplementedError, match="loglikelihood"):
    model.loglikelihood(requests[:1])
