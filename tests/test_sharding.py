"""The logical-axis rules (retina_jax/sharding.py): feature maps [B, H, W, C] named by the models
get their rows split over 'model' when config.mesh.model_parallelism > 1, unless the map is too
small (the small-map rule), and nothing is constrained without model parallelism.

What each rule gives a whole model is tests/test_spatial.py's (its steps' stem is split, its
numbers equal the unpartitioned step's)."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from retina_jax import sharding
from retina_jax.models import layers
from tests import tiny_detector


def _mesh(model_parallelism: int):
  config = tiny_detector.tiny_config(64)
  config.mesh.model_parallelism = model_parallelism
  return sharding.make_mesh(config, jax.devices()[:4])


@pytest.mark.parametrize('rows, model, split', [
    (16, 2, True), (4, 2, True), (4, 4, False), (2, 2, False), (5, 2, False), (3, 2, False),
    (8, 4, True)])
def test_rows_split_over_model_unless_the_map_is_small(rows, model, split):
  """Split when each device gets >= 2 rows and the split is even; whole otherwise. Batch always
  over 'data'; columns and channels whole."""
  mesh = _mesh(model)
  spec = sharding.logical_spec((2, rows, 8, 16), layers.FEATURE_MAP, mesh)
  assert spec == P('data', 'model' if split else None, None, None)


@pytest.mark.parametrize('rows, split', [(16, True), (2, False)])
def test_the_compiled_constraint_is_the_rule(rows, split):
  """model_parallelism 2 on 4 fake devices: what the compiled program lays out, not only the
  spec, follows the rule for a large map (16 rows) and a small one (2 rows, 1 per device)."""
  mesh = _mesh(2)
  x = jnp.zeros((2, rows, 8, 16))

  def f(x):
    with sharding.logical_axes(mesh):
      return sharding.constrain(x * 2, layers.FEATURE_MAP)

  (out,) = jax.tree.leaves(jax.jit(f).lower(x).compile().output_shardings)
  want = NamedSharding(mesh, P('data', 'model') if split else P('data'))
  assert out.is_equivalent_to(want, 4), out
  assert not out.is_equivalent_to(NamedSharding(mesh, P('data', None if split else 'model')), 4)


def test_no_constraint_without_model_parallelism_or_context():
  """A data-parallel mesh (model axis of 1) and code outside `logical_axes` leave activations
  as they are: no sharding constraint in the lowered program."""
  x = jnp.zeros((2, 16, 8, 16))
  constraints = lambda f: jax.jit(f).lower(x).as_text().count('sharding_constraint')

  def under(mesh):
    def f(x):
      with sharding.logical_axes(mesh):
        return sharding.constrain(x * 2, layers.FEATURE_MAP)
    return f

  assert constraints(under(_mesh(2))) == 1  # The count can see a constraint.
  assert constraints(under(_mesh(1))) == 0
  assert constraints(under(None)) == 0
  assert constraints(lambda x: sharding.constrain(x * 2, layers.FEATURE_MAP)) == 0
