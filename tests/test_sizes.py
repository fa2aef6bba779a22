"""The start-up size rules (retina_jax/sizes.py): each refusal is one line naming the field and a
value that the same check then accepts; no compile, no devices."""

import subprocess
import sys

import pytest

from retina_jax import config as config_lib
from retina_jax import sizes
from tests import tiny_detector

# Chips and hosts of the pods of benchmarks/RESULTS.md and the README (v5e hosts have 4 chips,
# v4 and v5p hosts 4 megacore chips), and one CPU.
PODS = {'cpu': (1, 1), 'v5e:2x2': (4, 1), 'v5e:4x4': (16, 4), 'v4:2x2x4': (16, 4),
        'v5e:8x8': (64, 16), 'v5p:4x4x4': (64, 16), 'v5e:16x16': (256, 64)}


def _r50(arg=''):
  return config_lib.load_experiment('experiments/retinanet_r50_coco.py').get_config(arg)


def _refusal(config, devices, hosts=1, **kwargs) -> str:
  with pytest.raises(sizes.SizeError) as error:
    sizes.check(config, devices, hosts, **kwargs)
  message = str(error.value)
  assert '\n' not in message
  return message


def _suggested(message: str) -> tuple[str, str]:
  """(field, value) of the message's 'e.g. --field=value'."""
  field, _, value = message.rpartition('e.g. --')[2].partition('=')
  return field, value


@pytest.mark.parametrize('pod', sorted(PODS))
def test_the_default_eval_batch_splits_on_every_pod(pod):
  devices, hosts = PODS[pod]
  config = _r50('batch=256')
  config.batch_size = max(devices, 16)
  assert config.eval_batch_size == 0
  checked = sizes.check(config, devices, hosts)
  assert checked.eval_batch_size >= sizes.MIN_EVAL_BATCH
  assert checked.eval_batch_size % devices == 0 and checked.eval_batch_size % hosts == 0
  assert checked.eval_batch_size < max(2 * devices, 2 * sizes.MIN_EVAL_BATCH)


def test_the_default_eval_batch_is_8_up_to_8_devices_and_the_demos_keep_theirs():
  assert [sizes.default_eval_batch_size(d, 1) for d in (1, 2, 4, 8)] == [8] * 4
  assert sizes.default_eval_batch_size(16, 4) == 16
  assert sizes.default_eval_batch_size(6, 4) == 12  # lcm(6, 4).
  demo = config_lib.load_experiment('experiments/smoke/shapes_demo.py').get_config()
  assert sizes.check(demo, 1).eval_batch_size == 16
  custom = config_lib.load_experiment('experiments/custom_data.py').get_config('batch=4')
  assert sizes.check(custom, 1).eval_batch_size == 4


def test_an_indivisible_batch_names_the_field_and_a_multiple_that_works():
  config = _r50('batch=64')
  config.eval_batch_size = 8
  message = _refusal(config, 16, 4)
  assert message.startswith('config.eval_batch_size=8 must be a multiple of the data-parallel '
                            'size 16 and of the number of hosts 4')
  assert _suggested(message) == ('config.eval_batch_size', '16')
  config.eval_batch_size = 16
  sizes.check(config, 16, 4)
  config.batch_size = 24
  message = _refusal(config, 16, 4)
  assert message.startswith('config.batch_size=24 must be a multiple of the data-parallel size 16')
  assert _suggested(message) == ('config.batch_size', '32')
  config.batch_size = 0
  assert _suggested(_refusal(config, 16, 4)) == ('config.batch_size', '16')


def test_hosts_count_even_where_the_devices_split_the_batch():
  """A model axis of 4 on 16 devices leaves 4 data shards, but 8 hosts each feed a share."""
  config = _r50()
  config.batch_size, config.eval_batch_size = 4, 4
  config.mesh.model_parallelism = 2
  message = _refusal(config, 16, 8)
  assert 'data-parallel size 8 and of the number of hosts 8' in message
  config.batch_size = 8
  assert _refusal(config, 16, 8).startswith('config.eval_batch_size=4')
  config.eval_batch_size = 0
  assert sizes.check(config, 16, 8).eval_batch_size == 8


def test_the_mesh_must_form_on_the_devices_and_keep_each_image_on_one_host():
  config = _r50()
  config.mesh.model_parallelism = 3
  message = _refusal(config, 16, 1)
  assert message.startswith('config.mesh.model_parallelism=3 must divide the 16 devices')
  assert _suggested(message) == ('config.mesh.model_parallelism', '2')
  config.mesh.model_parallelism = 8  # v5e:4x4 has 4 chips per host.
  message = _refusal(config, 16, 4)
  assert 'more chips than the 4 of one host' in message
  assert _suggested(message) == ('config.mesh.model_parallelism', '4')
  config.mesh.model_parallelism = 4
  assert sizes.check(config, 16, 4) == sizes.Sizes(16, 4, data=4, model=4, batch_size=16,
                                                   eval_batch_size=8)
  config.mesh.model_parallelism = 0
  assert _suggested(_refusal(config, 16, 4)) == ('config.mesh.model_parallelism', '1')


def test_a_fused_sweep_axis_divides_the_members_and_the_devices():
  config = _r50()
  config.mesh.sweep_parallelism = 2
  assert sizes.check(config, 4, 1).data == 4  # Not a fused run: no sweep axis.
  assert sizes.check(config, 4, 1, members=4).data == 2
  assert 'number of fused members (5)' in _refusal(config, 4, 1, members=5)
  config.mesh.sweep_parallelism = 3
  assert 'divide the 4 devices' in _refusal(config, 4, 1, members=3)


def test_canvases_and_the_export_batch():
  config = _r50()
  config.data.image_size = 1333
  message = _refusal(config, 1)
  assert message.startswith('config.data.image_size=1333 must be a positive multiple of 32')
  assert _suggested(message) == ('config.data.image_size', '1344')
  config.data.image_size = 1408
  config.data.train_buckets = 'portrait'
  assert 'config.data.train_buckets' in _refusal(config, 1)
  config.data.train_buckets = 'orientation'
  config.data.min_size = 0
  assert 'config.data.min_size=0 must be positive' in _refusal(config, 1)
  config.data.min_size = 800
  assert _refusal(config, 1, train=False, evaluate=False, export_batch=-1).startswith(
      '--batch_size=-1 must be 0')
  # Export builds no mesh: a batch the devices would not split is no concern of its.
  config.batch_size = 3
  assert sizes.check(config, 4, train=False, evaluate=False, export_batch=0).data == 1


def test_with_eval_batch_copies_only_when_it_changes_the_number():
  config = _r50()
  assert sizes.with_eval_batch(config, 0) is config
  resolved = sizes.with_eval_batch(config, 16)
  assert resolved.eval_batch_size == 16 and config.eval_batch_size == 0
  assert resolved.data.to_dict() == config.data.to_dict()


def test_training_stops_with_one_line_before_building_anything(tmp_path):
  """retina_jax.main refuses a canvas the model cannot tile: one line, exit 1, no traceback, no
  workdir. (One CPU device splits any batch, so the batch rules are left to the tests above.)"""
  out = subprocess.run(
      [sys.executable, '-m', 'retina_jax.main', '--config', 'experiments/smoke/shapes_demo.py',
       '--config.data.image_size=100', '--workdir', str(tmp_path / 'w')],
      capture_output=True, text=True, timeout=120,
      env=tiny_detector.subprocess_env(JAX_PLATFORMS='cpu'))
  assert out.returncode == 1, out.stderr
  assert 'config.data.image_size=100 must be a positive multiple of 32' in out.stderr
  assert 'Traceback' not in out.stderr
  assert not (tmp_path / 'w').exists()
