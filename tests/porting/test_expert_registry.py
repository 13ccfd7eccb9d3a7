"""The expert registry is the one place an expert plugs in: its port, its EAGLE tower
names and its parameters that are new on top of its checkpoint are read from there."""

import dataclasses
import importlib
import pkgutil
import re

import jax.numpy as jnp
import pytest

from leo_mini_jax import porting
from leo_mini_jax.models.vision import expert_config
from leo_mini_jax.models.vision import experts
from leo_mini_jax.models.vision import eva02 as eva02_lib
from leo_mini_jax.models.vision import sam as sam_lib
from leo_mini_jax.porting import convert
from leo_mini_jax.porting import convnext as convnext_port
from leo_mini_jax.porting import eagle
from leo_mini_jax.porting import eva02 as eva02_port
from leo_mini_jax.porting import expert_port
from leo_mini_jax.porting import sam as sam_port
from leo_mini_jax import stages


@pytest.fixture
def registry(monkeypatch):
  """A copy of the registry that a test may add to; the real one is restored after."""
  monkeypatch.setattr(experts, "_REGISTRY", dict(experts._REGISTRY))  # pylint: disable=protected-access


def test_every_registered_expert_has_a_port_that_keeps_the_contract():
  for name in experts.registered_experts():
    module = porting.vision_port(name)
    assert expert_port.missing_members(name, module) == [], name
    assert isinstance(module, expert_port.protocol_of(name)), name
  # The paper's five experts are all in EAGLE's releases, so their ports read EAGLE's too.
  assert {expert_port.protocol_of(name) for name in experts.registered_experts()} == {
      expert_port.EaglePort}


def test_every_port_module_is_registered():
  """A port module no registration names would be unreachable from config and converter."""
  registered = set(experts.port_modules().values())
  found = set()
  for info in pkgutil.iter_modules(porting.__path__, porting.__name__ + "."):
    module = importlib.import_module(info.name)
    if isinstance(module, expert_port.ExpertPort):
      found.add(info.name)
  assert found == registered
  assert porting.VISION_PORTS == experts.port_modules()


def test_every_port_takes_how_its_tower_computes_from_the_run():
  """A checkpoint never says the dtypes, rematerialisation, attention kernel or input
  normalisation: every port takes each of them its config has from the run's config."""
  for name in experts.registered_experts():
    config_fields = {f.name for f in dataclasses.fields(experts.expert_spec(name).config_cls)}
    runtime = {"dtype", "param_dtype", "remat", "mean", "std"}
    assert runtime <= config_fields, name  # ExpertConfig's fields, and every tower's mean/std
    runtime |= config_fields & {"attention_impl", "scan_layers"}
    run_fields = porting.vision_port(name).RUN_FIELDS
    assert runtime <= set(run_fields), (name, runtime - set(run_fields))
    assert len(set(run_fields)) == len(run_fields), name


@pytest.mark.parametrize("name", ["clip", "convnext", "pix2struct"])
def test_a_config_free_eagle_table_ignores_the_config(name):
  """The towers EAGLE stores as their reference checkpoints do: one table for any config."""
  port = porting.vision_port(name)
  default = experts.expert_spec(name).config_cls()
  small = (dataclasses.replace(default, depths=(1,) * len(default.dims)) if name == "convnext"
           else dataclasses.replace(default, num_layers=2))
  table = lambda cfg: [(r.source, r.targets, r.transform.name, r.stack)
                       for r in port.eagle_rules(cfg)]
  assert table(small) == table(default)
  assert table(small) and not any(s.startswith("visual") for s, *_ in table(small))


def test_a_new_experts_config_and_port_reuse_the_shared_fields_and_checks():
  """What a sixth expert writes: its own fields; dtypes, remat, the ViT size checks and
  its port's RUN_FIELDS come from the shared pieces."""

  @dataclasses.dataclass(frozen=True)
  class ToyConfig(expert_config.ExpertConfig):
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 16
    num_heads: int = 4
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    attention_impl: str | None = "auto"

    def __post_init__(self):
      self.check_vit_sizes()

  assert (ToyConfig().dtype, ToyConfig().param_dtype, ToyConfig().remat) == (
      "float32", "float32", False)
  assert ToyConfig.from_config({"dtype": "bfloat16"}).dtypes == (
      jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
  with pytest.raises(ValueError, match="ToyConfig.image_size=36 is not a multiple of "
                                       "patch_size=8"):
    ToyConfig(image_size=36)
  with pytest.raises(ValueError, match="ToyConfig.hidden_size=18 is not divisible by "
                                       "num_heads=4"):
    ToyConfig(hidden_size=18)
  assert expert_port.run_fields(ToyConfig, "image_size") == (
      "image_size", "mean", "std", "dtype", "param_dtype", "remat", "attention_impl")


def test_missing_members_names_what_a_port_lacks(registry):
  del registry
  experts.register_expert("toy", sam_lib.SamConfig, sam_lib.SamVisionTower,
                          port="leo_mini_jax.porting.clip", eagle_towers=("toy-64",))
  # The CLIP port has no toy_rules; an EAGLE tower needs eagle_rules, which it has.
  assert expert_port.missing_members("toy", porting.vision_port("clip")) == ["toy_rules"]
  experts.register_expert("toy2", sam_lib.SamConfig, sam_lib.SamVisionTower,
                          port="leo_mini_jax.porting.llama")
  from leo_mini_jax.porting import llama  # pylint: disable=import-outside-toplevel
  assert expert_port.protocol_of("toy2") is expert_port.ExpertPort
  assert expert_port.missing_members("toy2", llama) == [
      "toy2_rules", "RUN_FIELDS", "load_expert", "open_source"]


def test_eagle_tower_names_come_from_the_registry(registry):
  del registry
  assert eagle.EAGLE_TOWERS == experts.eagle_tower_experts()
  assert experts.eagle_tower_experts() == {
      "clip-448": "clip", "clip-336": "clip", "clip-224": "clip",
      "convnext-1024": "convnext", "det-1024": "eva02", "pix2struct-1024": "pix2struct",
      "sam-1024": "sam"}
  experts.register_expert("toy", sam_lib.SamConfig, sam_lib.SamVisionTower,
                          port="leo_mini_jax.porting.sam", eagle_towers=("toy-64",))
  assert experts.eagle_tower_experts()["toy-64"] == "toy"
  with pytest.raises(ValueError, match="EAGLE tower 'sam-1024' is already registered for 'sam'"):
    experts.register_expert("toy3", sam_lib.SamConfig, sam_lib.SamVisionTower,
                            port="leo_mini_jax.porting.sam", eagle_towers=("sam-1024",))


def _table(rules):
  """What a rule does, with where it stacks layer 3 (the block layout follows the config)."""
  return [(rule.source, rule.target, rule.transform.name, rule.stack,
           rule.groups({"layer": "3"}) if rule.groups else None) for rule in rules]


def test_eagle_tables_are_the_ports_own():
  """Each port's eagle_rules is the table EAGLE's wrapper of its reference model needs."""
  sam_cfg = sam_lib.SamConfig(num_layers=4, global_attn_indexes=(1, 3))
  eva_cfg = eva02_lib.Eva02Config(num_layers=4, window_block_indexes=(0, 2))
  assert _table(eagle._expert_rules("sam", sam_cfg)) == _table(  # pylint: disable=protected-access
      sam_port.sam_rules(neck="eagle", config=sam_cfg))
  assert _table(eagle._expert_rules("eva02", eva_cfg)) == _table(  # pylint: disable=protected-access
      eva02_port.eva02_rules(config=eva_cfg))
  # A scan group of 2 blocks, not SAM ViT-L's 4 or EVA-02-L's 3.
  assert {groups["block"] for *_, groups in _table(eagle._expert_rules(  # pylint: disable=protected-access
      "sam", sam_cfg)) if groups} == {1}
  assert _table(eagle._expert_rules("convnext", None)) == _table(  # pylint: disable=protected-access
      convnext_port.convnext_rules(open_clip=False))


def test_fresh_parameters_come_from_the_registry(registry):
  del registry
  neck = "vision/sam/eagle_neck/conv1/kernel"
  tower = "vision/sam/layers/blocks_0/attn/proj/kernel"
  assert experts.fresh_params() == "vision/sam/eagle_neck/.*"
  assert sam_port.EAGLE_NECK == experts.expert_spec("sam").fresh
  for regex in (convert.NEW_MODULES, stages.STAGE_NEW_PARAMS[1], stages.SAM_NECK_RULE[0]):
    assert regex.endswith(experts.fresh_params())
    assert re.fullmatch(regex, neck) and not re.fullmatch(regex, tower)
  # Stage 1 still starts the projector and CoTR fresh, and nothing else.
  for path, fresh in (("projector/fc1/kernel", True), ("reducer/x", True),
                      ("llm/layers/mlp/mmoe_a", False), ("vision/clip/x", False)):
    assert bool(re.fullmatch(stages.STAGE_NEW_PARAMS[1], path)) == fresh, path
  experts.register_expert("toy", sam_lib.SamConfig, sam_lib.SamVisionTower,
                          port="leo_mini_jax.porting.sam", fresh="adapter/.*")
  combined = experts.fresh_params()
  assert re.fullmatch(combined, neck) and re.fullmatch(combined, "vision/toy/adapter/w")
  assert not re.fullmatch(combined, "vision/toy/layers/w")
  with pytest.raises(re.error):
    experts.register_expert("toy4", sam_lib.SamConfig, sam_lib.SamVisionTower,
                            port="leo_mini_jax.porting.sam", fresh="(adapter")


def test_no_fresh_parameters_match_nothing(registry):
  del registry
  experts._REGISTRY.pop("sam")  # pylint: disable=protected-access
  assert experts.fresh_params() == r"$^"
  assert not re.fullmatch(experts.fresh_params(), "vision/sam/eagle_neck/conv1/kernel")
