"""The shared layer builders (models/layers.py) and the towers' use of them."""

import ast
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from leo_mini_jax.models import layers

VISION_DIR = pathlib.Path(layers.__file__).parent / "vision"
TOWERS = ("clip", "convnext", "eva02", "pix2struct", "sam")


def _axes(variables):
  """{path: logical names} of a boxed parameter tree."""
  flat = jax.tree_util.tree_flatten_with_path(
      variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  return {"/".join(k.key for k in path): leaf.names for path, leaf in flat}


def test_conv_names_and_matches_lax_conv():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  module = layers.conv(4, 2, "c", stride=2)
  variables = module.init(jax.random.PRNGKey(1), x)
  assert _axes(variables) == {"kernel": layers.CONV_AXES, "bias": ("conv_out",)}
  params = nn.unbox(variables)["params"]
  want = jax.lax.conv_general_dilated(
      x, params["kernel"], (2, 2), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["bias"]
  np.testing.assert_allclose(module.apply(variables, x), want, rtol=1e-6, atol=1e-6)


def test_conv_without_bias_and_patch_axes():
  module = layers.conv(5, 4, "p", stride=4, use_bias=False, axes=layers.PATCH_EMBED_AXES)
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  assert _axes(variables) == {"kernel": layers.PATCH_EMBED_AXES}


def test_layer_norm_exact_variance_and_norm_axes():
  # A large offset: the fast E[x²]−E[x]² variance would lose the small spread.
  x = 1e4 + jax.random.normal(jax.random.PRNGKey(0), (3, 16))
  module = layers.layer_norm("ln", 1e-6)
  variables = module.init(jax.random.PRNGKey(1), x)
  assert _axes(variables) == {"scale": ("norm",), "bias": ("norm",)}
  x64 = np.asarray(x, np.float64)
  want = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(module.apply(variables, x), want, rtol=1e-3, atol=1e-3)


def test_rms_norm_casts_before_the_scale():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8)) * 3
  module = layers.RMSNorm(1e-6, jnp.bfloat16, jnp.float32)
  variables = module.init(jax.random.PRNGKey(1), x)
  assert _axes(variables) == {"scale": ("norm",)}
  params = {"params": {"scale": jnp.linspace(0.5, 2.0, 8)}}
  x32 = np.asarray(x, np.float32)
  normed = x32 / np.sqrt((x32 * x32).mean(-1, keepdims=True) + 1e-6)
  want = (jnp.asarray(params["params"]["scale"], jnp.bfloat16)
          * jnp.asarray(normed, jnp.bfloat16))
  got = module.apply(params, x)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=1e-2, atol=1e-2)


def test_rms_norm_axis_name():
  variables = layers.RMSNorm(axis_name="cotr").init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
  assert _axes(variables) == {"scale": ("cotr",)}


def test_mlp_is_fc2_of_activation_of_fc1():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4))
  module = layers.Mlp(8, 4, layers.exact_gelu, ("lin1", "lin2"))
  variables = module.init(jax.random.PRNGKey(1), x)
  assert _axes(variables) == {
      "lin1/kernel": layers.MLP_IN_AXES, "lin1/bias": ("vision_mlp",),
      "lin2/kernel": layers.MLP_OUT_AXES, "lin2/bias": ("vision_embed",)}
  p = nn.unbox(variables)["params"]
  hidden = jax.nn.gelu(x @ p["lin1"]["kernel"] + p["lin1"]["bias"], approximate=False)
  want = hidden @ p["lin2"]["kernel"] + p["lin2"]["bias"]
  np.testing.assert_allclose(module.apply(variables, x), want, rtol=1e-6, atol=1e-6)


def test_towers_build_layers_from_the_shared_toolkit():
  """No tower defines its own dense/norm/conv builder or imports a sibling tower."""
  for tower in TOWERS:
    tree = ast.parse((VISION_DIR / f"{tower}.py").read_text())
    defined = {node.name for node in tree.body
               if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert not defined & {"_dense", "_layer_norm", "_conv", "RMSNorm"}, tower
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    siblings = {f"leo_mini_jax.models.vision.{t}" for t in TOWERS} | {"leo_mini_jax.models.llama"}
    assert not imported & siblings, (tower, imported & siblings)
