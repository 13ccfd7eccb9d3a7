"""PyTorch checkpoints → a params checkpoint that `train.py --config.init_from=DIR` starts from.

    python -m leo_mini_jax.porting.convert \
        --config configs/leo_mini_llama3_8b.py:stage=1 \
        --llm /ckpt/Meta-Llama-3-8B-Instruct \
        --expert clip=/ckpt/clip-vit-large-patch14-336 \
        --expert convnext=/ckpt/convnext_xxlarge.clip_laion2b_soup \
        --out /ckpt/leo-mini-llama3-init
    python -m leo_mini_jax.porting.convert --config configs/tiny.py:stage=1 \
        --llm /ckpt/tiny-llama --out /ckpt/tiny-init   # the LLM alone
    python train.py --config configs/leo_mini_llama3_8b.py:stage=1 --workdir /runs/s1 \
        --config.init_from=/ckpt/leo-mini-llama3-init

The LEO-MINI model the config describes is built abstractly (`jax.eval_shape`, no
weights allocated); its LLM comes from the HF folder (`llm/...`) and every vision expert
from its checkpoint (`vision/<name>/...`). An expert given no `--expert` is not ported: it
is initialised fresh, with the values train.py's own init at `config.seed` gives, and
named in the output (so the LLM can be ported alone). All sources are converted in one pass through a
`readers.CombinedReader`, so every missing, unexpected or mismatched tensor of every
checkpoint is reported at once. Before any tensor is read, the architecture each
checkpoint declares (config.json, or the tensor shapes for timm) is compared with the
config's, and every disagreement is named (a wrong rope_theta or activation would
otherwise load without a shape error and compute something else).

Output format: an orbax PyTree checkpoint directory (`ocp.PyTreeCheckpointer`, written by
`checkpoints.save_params`) holding one item `{'params': params}`, where `params`
is the nested dict of the LeoMini params tree with the ported parameters only, in the
config's param dtypes: `llm/...` and `vision/<name>/...`. New modules — the projector,
the reducer (CoTR/MQT) and MMoE-LLM's LoRA experts and routers, i.e. `--allow_missing`
— are left out; `train.py` initialises them fresh (its `STAGE_NEW_PARAMS`) and requires
everything else. Conversion streams tensor by tensor, casting as it goes: the host holds
about one copy of the weights.
"""

import dataclasses
import os
import re
import time
from typing import Any, Mapping

import jax
import ml_collections

from leo_mini_jax import config_validation
from leo_mini_jax import porting
from leo_mini_jax.porting import llama as llama_port
from leo_mini_jax.porting import mapping
from leo_mini_jax.porting import readers

# Parameters of modules that LEO-MINI adds on top of the ported LLM and experts, and the
# experts' own parameters that are new on top of their checkpoints (the expert registry's
# `fresh`: SAM's EAGLE neck).
NEW_MODULES = r"(projector|reducer)/.*|llm/.*/mmoe_.*|" + porting.experts.fresh_params()
# What an EAGLE release (= a stage-2 model) lacks for stage 3: CoTR and MMoE-LLM.
EAGLE_NEW_MODULES = r"reducer/.*|llm/.*/mmoe_.*"

# LlamaConfig fields a HF checkpoint does not determine; taken from the model config.
LLM_RUN_FIELDS = ("dtype", "param_dtype", "attention_impl", "scan_layers", "remat_policy",
                  "mmoe", "max_position_embeddings")


def _differences(where: str, ours: Any, theirs: Any, source: str) -> list[str]:
  return [f"{where}.{f.name}: the config says {getattr(ours, f.name)!r}, {source} has "
          f"{getattr(theirs, f.name)!r}"
          for f in dataclasses.fields(ours) if getattr(ours, f.name) != getattr(theirs, f.name)]


def _normalise_llm(cfg):
  """Same architecture, same config: spell defaulted head_dim / kv heads out."""
  return dataclasses.replace(cfg, head_dim=cfg.dim_per_head, num_kv_heads=cfg.kv_heads)


def llm_differences(model_config, hf_llm, where: str) -> list[str]:
  """The LLM-architecture disagreements between the run config and an HF config."""
  llm_overrides = {f: getattr(model_config.llm, f) for f in LLM_RUN_FIELDS}
  hf_config = llama_port.config_from_hf(hf_llm, **llm_overrides)
  return _differences("model.llm", _normalise_llm(model_config.llm), _normalise_llm(hf_config),
                      where)


def build_sources(model_config, llm_path: str, expert_paths: Mapping[str, str]):
  """(CombinedReader, rules) for the LLM and the experts in `expert_paths` (the config's
  other experts are not read); raises ValueError naming every disagreement."""
  problems = []
  names = [name for name, _ in model_config.experts]
  for name in sorted(set(expert_paths) - set(names)):
    problems.append(f"--expert {name}=... names an expert the config does not have "
                    f"(config experts: {names})")
  problems += llm_differences(model_config, llm_path, os.path.join(llm_path, "config.json"))
  sources = {"llm": readers.open_checkpoint(llm_path)}
  rules = mapping.prefixed(llama_port.llama_rules(model_config.llm), "llm:", "llm/")
  for name, cfg in model_config.experts:
    if name not in expert_paths:
      continue
    if name not in porting.VISION_PORTS:
      problems.append(f"expert {name!r}: no checkpoint port (ports exist for "
                      f"{sorted(porting.VISION_PORTS)})")
      continue
    port = porting.vision_port(name)
    overrides = {f: getattr(cfg, f) for f in port.RUN_FIELDS}
    reader, expert_rules, derived = port.open_source(expert_paths[name], cfg, overrides)
    problems += _differences(f"model.experts[{name}]", cfg, derived, expert_paths[name])
    sources[name] = reader
    rules += mapping.prefixed(expert_rules, f"{name}:", f"vision/{name}/")
  if problems:
    raise ValueError("the checkpoints do not match the config:\n  " + "\n  ".join(problems))
  return readers.CombinedReader(sources), rules


def build_eagle_sources(model_config, eagle_dir: str):
  """(reader, rules) for an EAGLE release folder (see `porting/eagle.py`)."""
  from leo_mini_jax.porting import eagle  # pylint: disable=import-outside-toplevel
  return eagle.build_sources(model_config, eagle_dir,
                             lambda hf, where: llm_differences(model_config, hf, where))


def build_model_config(config: ml_collections.ConfigDict):
  """The `LeoMiniConfig` of a run config (its `model` section)."""
  from leo_mini_jax.models import leo_mini  # pylint: disable=import-outside-toplevel
  return leo_mini.LeoMiniConfig.from_config(config.model)


def _fresh_params(model, batch, seed: int, paths: list[str], host) -> dict[str, Any]:
  """{path: value} of `paths` from the model's init at `seed` (train.py's init_state values);
  under jit the initialisers of every other parameter are dead code, so only these run."""
  def init(rng):
    flat = mapping.flatten_tree(model.init(rng, batch)["params"])
    return {p: flat[p] for p in paths}
  return jax.jit(init, out_shardings={p: host for p in paths})(jax.random.PRNGKey(seed))


def _convert(config: ml_collections.ConfigDict, build_sources_fn, out_dir: str,
             allow_missing: str, fresh_experts: tuple[str, ...] = ()) -> dict[str, Any]:
  """Builds the config's abstract LeoMini tree, fills it from `build_sources_fn(model
  config) -> (reader, rules)` (and `fresh_experts` from a fresh init), saves it at
  `out_dir`; returns a summary."""
  from leo_mini_jax import batch as batch_lib  # pylint: disable=import-outside-toplevel
  from leo_mini_jax import checkpoints as checkpoints_lib  # pylint: disable=import-outside-toplevel
  from leo_mini_jax.models import factory  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  model = factory.build_model(config)
  expected = factory.abstract_params(config, model, boxed=False)
  reader, rules = build_sources_fn(model.config)
  fresh_pattern = "|".join(f"vision/{name}/.*" for name in fresh_experts)
  if fresh_pattern:
    allow_missing = f"{allow_missing}|{fresh_pattern}"
  # Keep the weights in host memory even where an accelerator is present: they only
  # pass through on their way to disk.
  host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  with reader:
    params = mapping.convert(reader, rules, expected, allow_missing=allow_missing,
                             fill=mapping.OMIT, shardings=jax.tree.map(lambda _: host, expected))
  written = mapping.flatten_tree(params)
  fresh = sorted(p for p in mapping.flatten_tree(expected)
                 if fresh_pattern and re.fullmatch(fresh_pattern, p))
  if fresh:
    written.update(_fresh_params(model, batch_lib.dummy_batch(config), int(config.seed), fresh, host))
  checkpoints_lib.save_params(os.fspath(out_dir), mapping.unflatten_tree(written))
  left = sorted(set(mapping.flatten_tree(expected)) - set(written))
  return {
      "out": os.path.abspath(os.fspath(out_dir)),
      "num_params": sum(int(x.size) for x in written.values()),
      "num_tensors": len(written),
      "left_for_init": left,
      "fresh_experts": {name: sum(p.startswith(f"vision/{name}/") for p in fresh)
                        for name in fresh_experts},
      "seconds": time.perf_counter() - start,
  }


def convert_checkpoints(config: ml_collections.ConfigDict, llm_path: str,
                        expert_paths: Mapping[str, str], out_dir: str,
                        allow_missing: str = NEW_MODULES) -> dict[str, Any]:
  """Ports the LLM and the experts in `expert_paths` into the config's LeoMini tree and
  saves it at `out_dir`; the config's other experts are initialised fresh (train.py's
  init at `config.seed`).

  Returns a summary: parameter counts written, the experts initialised fresh (name →
  tensors) and the paths left for train.py to init.
  """
  paths = {k: os.fspath(v) for k, v in expert_paths.items()}
  names = [name for name, _ in build_model_config(config).experts]
  fresh = tuple(name for name in names if name not in paths)
  return _convert(config, lambda mc: build_sources(mc, os.fspath(llm_path), paths), out_dir,
                  allow_missing, fresh)


def convert_eagle(config: ml_collections.ConfigDict, eagle_dir: str, out_dir: str,
                  allow_missing: str = EAGLE_NEW_MODULES) -> dict[str, Any]:
  """Ports an EAGLE release (LLM, experts, projector) for a stage-3 (or stage-2) run.

  Everything but CoTR and MMoE-LLM (`allow_missing`) must be in the release.
  """
  return _convert(config, lambda mc: build_eagle_sources(mc, os.fspath(eagle_dir)), out_dir,
                  allow_missing)


def main() -> None:
  from absl import app  # pylint: disable=import-outside-toplevel
  from leo_mini_jax import cli  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  from absl import logging  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flag = config_flags.DEFINE_config_file(
      "config", None, "LEO-MINI config file (path:arg), as for train.py.", lock_config=True)
  llm = flags.DEFINE_string("llm", None, "HF LLaMA-family folder (config.json + weights).")
  eagle = flags.DEFINE_string(
      "eagle", None, "EAGLE release folder (LLM + experts + projector); replaces --llm/--expert.")
  experts = flags.DEFINE_multi_string(
      "expert", [], "NAME=PATH for a vision expert of the config (e.g. clip=/ckpt/clip); "
      "experts not given are initialised fresh.")
  out = flags.DEFINE_string("out", None, "Output directory (orbax params checkpoint).")
  allow = flags.DEFINE_string("allow_missing", None,
                              "Regex of parameter paths left for train.py to initialise "
                              f"(default {NEW_MODULES!r}; with --eagle {EAGLE_NEW_MODULES!r}).")
  flags.mark_flags_as_required(["config", "out"])

  def run(argv):
    del argv
    # absl, orbax and jax report every step at INFO; the summary below is what matters.
    logging.set_verbosity(logging.WARNING)
    try:
      convert_from_flags()
    except KeyError as e:  # a missing checkpoint key: cli.run prints it like the others
      raise mapping.PortError(f"{type(e).__name__}: {e}") from e


  def convert_from_flags():
    # Conversion uses no mesh and reads no init_from; the run that loads it checks both.
    config_validation.validate_config(config_flag.value, device_count=0, trace_model=False,
                                      init_from=False)
    if eagle.value:
      if llm.value or experts.value:
        raise app.UsageError("--eagle replaces --llm and --expert; give one or the other")
      summary = convert_eagle(config_flag.value, eagle.value, out.value,
                              allow.value or EAGLE_NEW_MODULES)
      _print_summary(summary)
      return
    if not llm.value:
      raise app.UsageError("give --llm (with --expert NAME=PATH per expert) or --eagle")
    paths = {}
    for item in experts.value:
      name, sep, path = item.partition("=")
      if not sep or not name or not path:
        raise app.UsageError(f"--expert {item!r}: expected NAME=PATH")
      if name in paths:
        raise app.UsageError(f"--expert {name}: given twice")
      paths[name] = path
    summary = convert_checkpoints(config_flag.value, llm.value, paths, out.value,
                                  allow.value or NEW_MODULES)
    _print_summary(summary)

  cli.run(run, prog="convert")


def _print_summary(summary: dict[str, Any]) -> None:
  print(f"wrote {summary['num_tensors']} tensors ({summary['num_params']:,} parameters) to "
        f"{summary['out']} in {summary['seconds']:.1f}s")
  fresh = summary.get("fresh_experts")
  if fresh:
    print("not ported, initialised fresh at config.seed (no --expert given): "
          + ", ".join(f"vision/{name} ({n} tensors)" for name, n in fresh.items()))
  if summary["left_for_init"]:
    print(f"left for train.py to initialise ({len(summary['left_for_init'])}): "
          + ", ".join(summary["left_for_init"]))


if __name__ == "__main__":
  main()
