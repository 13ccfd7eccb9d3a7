"""An EAGLE HF release (Eagle-X4 / Eagle-X5 layout) → the LEO-MINI params tree.

LEO-MINI's stages 1–2 are EAGLE, so a released EAGLE model is a stage-2 checkpoint: the
LLM, every vision expert and the projector. Starting stage 3 from it needs only CoTR and
MMoE-LLM fresh.

    python -m leo_mini_jax.porting.convert --config configs/leo_mini_llama3_8b.py:stage=3 \
        --eagle /ckpt/Eagle-X4-8B --out /ckpt/leo_mini_llama3_from_eagle

Release layout (one HF folder, single or sharded safetensors / .bin):

    config.json: LLaMA fields + mm_vision_tower ('clip-448;convnext-1024;...'),
                 mm_projector_type ('mlp2x_gelu'), mm_hidden_size (Σ d_i)
    model.embed_tokens / model.layers.* / model.norm / lm_head       → llm/...
    model.vision_tower[.vision_tower].vision_towers.{i}.vision_tower.<the expert's own keys>
                                                                      → vision/<name>/...
    model.mm_projector.{0,2}.{weight,bias}                            → projector/fc{1,2}/...

Each EAGLE tower wrapper keeps the reference model as its `vision_tower` attribute, so
under the prefix sit the keys the expert's own port reads (HF CLIPVisionModel, timm
ConvNeXt, EVA-02's backbone without `backbone.net.`, SamVisionEncoder with EAGLE's short
neck, Pix2StructVisionModel); each expert's mapping table is reused under that prefix.
The release's `mm_vision_tower` decides which experts exist and in which order; it must
equal the run config's `model.experts`.
"""

import dataclasses
import os
from typing import Any

from leo_mini_jax import porting
from leo_mini_jax.models.vision import experts
from leo_mini_jax.porting import llama as llama_port
from leo_mini_jax.porting import mapping
from leo_mini_jax.porting import readers

# EAGLE's tower names (mm_vision_tower entries) → our expert registry names: each
# expert's `eagle_towers` in the registry (`models/vision/experts.py`).
EAGLE_TOWERS = experts.eagle_tower_experts()
TOWER_PREFIXES = ("model.vision_tower.vision_tower.vision_towers.",
                  "model.vision_tower.vision_towers.")
# EAGLE's wrappers hold the reference model as `self.vision_tower`.
WRAPPER_PREFIX = "vision_tower."
PROJECTOR_TYPES = ("mlp2x_gelu",)


@dataclasses.dataclass(frozen=True)
class EagleRelease:
  """What a release's config.json says about its structure."""
  folder: str
  experts: tuple[str, ...]       # our registry names, in the release's order
  towers: tuple[str, ...]        # EAGLE's names, same order
  llm_config: dict[str, Any]     # the LLaMA part of config.json
  projector_type: str
  mm_hidden_size: int | None


def read_release(folder: str | os.PathLike) -> EagleRelease:
  """Parses an EAGLE release folder's config.json; errors name the file and field."""
  folder = os.fspath(folder)
  where = os.path.join(folder, "config.json")
  if not os.path.isfile(where):
    raise FileNotFoundError(f"{where}: no config.json (an EAGLE release folder needs one)")
  hf = readers.read_json(where)
  towers_field = hf.get("mm_vision_tower")
  if not isinstance(towers_field, str) or not towers_field:
    raise ValueError(f"{where}: mm_vision_tower is missing; this is not an EAGLE release")
  towers = tuple(t.strip() for t in towers_field.split(";") if t.strip())
  unknown = [t for t in towers if t not in EAGLE_TOWERS]
  if unknown:
    raise ValueError(f"{where}: mm_vision_tower names tower(s) {unknown} that have no port; "
                     f"known: {sorted(EAGLE_TOWERS)}")
  projector_type = hf.get("mm_projector_type", "linear")
  if projector_type not in PROJECTOR_TYPES:
    raise ValueError(f"{where}: mm_projector_type={projector_type!r} is not supported "
                     f"(LEO-MINI's projector is {PROJECTOR_TYPES})")
  llm = {k: v for k, v in hf.items() if not k.startswith("mm_")}
  # EAGLE's own model types wrap a plain LLaMA.
  llm["model_type"] = "llama"
  mm_hidden = hf.get("mm_hidden_size")
  return EagleRelease(folder=folder, experts=tuple(EAGLE_TOWERS[t] for t in towers),
                      towers=towers, llm_config=llm, projector_type=projector_type,
                      mm_hidden_size=None if mm_hidden is None else int(mm_hidden))


def projector_rules(target_prefix: str = "projector/") -> list[mapping.Rule]:
  """EAGLE's mlp2x_gelu `nn.Sequential(Linear, GELU, Linear)` → Projector fc1 / fc2."""
  rules = []
  for index, name in (("0", "fc1"), ("2", "fc2")):
    rules.append(mapping.Rule(rf"model\.mm_projector\.{index}\.weight",
                              f"{target_prefix}{name}/kernel", mapping.LINEAR))
    rules.append(mapping.Rule(rf"model\.mm_projector\.{index}\.bias",
                              f"{target_prefix}{name}/bias"))
  return rules


def _expert_rules(name: str, cfg: Any) -> list[mapping.Rule]:
  """The expert's own mapping table (keys relative to the reference model's root)."""
  return porting.vision_port(name).eagle_rules(cfg)


def _tower_prefix(reader: readers.CheckpointReader, where: str) -> str:
  keys = reader.keys()
  for prefix in TOWER_PREFIXES:
    if any(k.startswith(prefix) for k in keys):
      return prefix
  raise ValueError(f"{where}: no vision tower weights under {' or '.join(TOWER_PREFIXES)}; "
                   "this is not an EAGLE multi-expert release")


def check_release(release: EagleRelease, model_config) -> list[str]:
  """Every disagreement between the release and the run's model config."""
  problems = []
  where = os.path.join(release.folder, "config.json")
  names = tuple(model_config.expert_names)
  if release.experts != names:
    problems.append(f"{where}: the release's experts are {list(release.experts)} "
                    f"(mm_vision_tower {';'.join(release.towers)}), the config's model.experts "
                    f"are {list(names)}; they must be the same, in the same order")
  feature_dims = sum(info.feature_dim for info in model_config.expert_infos)
  if (release.experts == names and release.mm_hidden_size is not None
      and release.mm_hidden_size != feature_dims):
    problems.append(f"{where}: mm_hidden_size={release.mm_hidden_size}, the config's experts "
                    f"give {feature_dims} channels")
  return problems


def build_sources(model_config, folder: str | os.PathLike, llm_differences
                  ) -> tuple[readers.CheckpointReader, list[mapping.Rule]]:
  """(reader, rules) for the release; raises ValueError naming every disagreement.

  `llm_differences(hf_llm_config, where)` returns the LLM-config disagreements (the
  converter's check shared with `--llm`).
  """
  release = read_release(folder)
  problems = check_release(release, model_config)
  where = os.path.join(release.folder, "config.json")
  problems += llm_differences(release.llm_config, where)
  if problems:
    raise ValueError("the EAGLE release does not match the config:\n  " + "\n  ".join(problems))
  reader = readers.open_checkpoint(release.folder)
  prefix = _tower_prefix(reader, release.folder)
  rules = mapping.prefixed(llama_port.llama_rules(model_config.llm), "", "llm/")
  for index, (name, cfg) in enumerate(model_config.experts):
    rules += mapping.prefixed(_expert_rules(name, cfg), f"{prefix}{index}.{WRAPPER_PREFIX}",
                              f"vision/{name}/")
  rules += projector_rules()
  return reader, rules


def tower_key_prefix(index: int, nested: bool = False) -> str:
  """The key prefix of expert `index` in a release (for writing test releases)."""
  return TOWER_PREFIXES[0 if nested else 1] + f"{index}.{WRAPPER_PREFIX}"


__all__ = ["EAGLE_TOWERS", "EagleRelease", "read_release", "check_release", "build_sources",
           "projector_rules", "tower_key_prefix"]
