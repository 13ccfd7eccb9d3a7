"""Logical axis names: a name without a rule is an error that names it and where it is
used, for parameters (`logical_shardings`, `gathered`), rules tables (`check_rules`) and
activations (the names the paper models constrain: test_sharding_golden.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec as P
import pytest

from leo_mini_jax.parallel import axes
from leo_mini_jax.parallel import mesh as mesh_lib

MESH = AbstractMesh((1, 4, 1), axes.MESH_AXES)


class Tower(nn.Module):
  kernel_names: tuple = ("embed", "mlp")

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.zeros, self.kernel_names), (x.shape[-1], 8))
    return x @ mesh_lib.gathered(kernel, self.kernel_names)


class Model(nn.Module):
  kernel_names: tuple = ("embed", "mlp")

  @nn.compact
  def __call__(self, x):
    return Tower(self.kernel_names, name="tower")(x)


def _abstract_params(model):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 16)))


def test_parameters_resolve_by_their_names():
  shardings = mesh_lib.logical_shardings(_abstract_params(Model()), MESH)
  assert shardings["params"]["tower"]["kernel"].spec == P("fsdp")


def test_a_misspelled_parameter_axis_is_an_error_naming_it_and_the_parameter():
  # Before: 'embd' matched no rule and the kernel was silently replicated.
  with pytest.raises(ValueError, match=r"params/tower/kernel: logical axis 'embd'"):
    mesh_lib.logical_shardings(_abstract_params(Model(("embd", "mlp"))), MESH)


def test_a_misspelled_axis_at_a_weights_use_names_the_module():
  mesh = jax.make_mesh((1, 4, 1), axes.MESH_AXES, devices=jax.devices()[:4])
  params = {"tower": {"kernel": jnp.zeros((16, 8))}}
  with mesh_lib.activate(mesh):
    with pytest.raises(ValueError, match=r"tower: logical axis 'embd'"):
      jax.eval_shape(Model(("embd", "mlp")).apply, {"params": params}, jnp.zeros((2, 16)))


@pytest.mark.parametrize("rules, message", [
    (mesh_lib.DEFAULT_RULES + (("emebd", "fsdp"),), r"unknown logical axis 'emebd'"),
    (mesh_lib.DEFAULT_RULES + (("embed", "fdsp"),), r"unknown mesh axes \['fdsp'\]"),
    (mesh_lib.DEFAULT_RULES + (("embed", ("data", "model")),), r"unknown mesh axes \['model'\]"),
    (tuple(r for r in mesh_lib.DEFAULT_RULES if r[0] != "conv_width"),
     r"no rule for logical axes \['conv_width'\]"),
    (mesh_lib.DEFAULT_RULES + (("embed",),), r"expected \(logical name, mesh axes\)"),
])
def test_a_rules_table_must_name_known_axes_and_cover_them(rules, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.check_rules(rules)
  # Both places the rules enter: the state's shardings and the traced model's context.
  with pytest.raises(ValueError, match=message):
    mesh_lib.logical_shardings(_abstract_params(Model()), MESH, rules)
  with pytest.raises(ValueError, match=message):
    with mesh_lib.activate(jax.make_mesh((1, 1, 1), axes.MESH_AXES,
                                         devices=jax.devices()[:1]), rules):
      pass


def test_config_rules_as_lists_are_accepted():
  # config.sharding_rules holds lists ([name, [axes]]) after a round trip through a config.
  mesh_lib.check_rules([[k, list(v) if isinstance(v, tuple) else v]
                        for k, v in mesh_lib.DEFAULT_RULES])


def test_the_default_rules_cover_exactly_the_known_names():
  mesh_lib.check_rules(mesh_lib.DEFAULT_RULES)
  assert {r[0] for r in mesh_lib.DEFAULT_RULES} == set(axes.LOGICAL_AXES)
  assert len(set(axes.LOGICAL_AXES)) == len(axes.LOGICAL_AXES)
