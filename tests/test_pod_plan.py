"""pod_plan compiles the tiny detector's train step and detector for real TPU topologies (the
TPU runtime's compile-only devices; no TPU needed) and reads memory, cost and collectives."""

import collections
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tests import tiny_detector

pytest.importorskip('libtpu', reason='the TPU runtime is not installed: '
                    'pip install -r requirements-tpu.txt')

from retina_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from retina_jax import models  # pylint: disable=g-import-not-at-top
from retina_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
from retina_jax import train  # pylint: disable=g-import-not-at-top
from retina_jax.tools import hlo_stats  # pylint: disable=g-import-not-at-top
from retina_jax.tools import pod_plan  # pylint: disable=g-import-not-at-top

TOPOLOGIES = {'v5e:2x2': 4, 'v4:2x2x1': 4}  # Chips: v4 as one megacore device per chip.


def _config():
  config = tiny_detector.tiny_config(64)
  config.batch_size = 8
  config.eval_batch_size = 4
  config.num_train_steps = 1000
  return config


@pytest.fixture(scope='module', params=sorted(TOPOLOGIES))
def report(request):
  return pod_plan.plan(_config(), request.param, breakdown=3)


def test_compiles_the_train_step_and_detector_for_the_topology(report):
  assert report['chips'] == TOPOLOGIES[report['topology']]
  assert report['hosts'] == 1 and report['batch_per_chip'] == 2
  assert [p['canvas'] for p in report['train_steps']] == [[64, 64]]
  assert [p['canvas'] for p in report['detectors']] == [[64, 64]]
  for program in (*report['train_steps'], *report['detectors']):
    memory = program['memory']
    assert 0 < memory['arguments'] and 0 < memory['peak'] < report['chip']['hbm_bytes']
    assert program['flops'] > 0 and program['bytes_accessed'] > 0
    assert program['bound_seconds'] == max(program['flops_seconds'], program['bytes_seconds'])
  pod_plan.check_fits(report)
  (step,), (detector,) = report['train_steps'], report['detectors']
  assert report['schedule_hours_at_bound'] == pytest.approx(1000 * step['bound_seconds'] / 3600)
  assert report['schedule_hours_at_mfu'] >= report['schedule_hours_at_bound']
  # Input each host must deliver at the bound, and the detector's time per evaluation pass.
  assert report['input_images_per_second_per_host'] == pytest.approx(8 / step['bound_seconds'])
  assert report['eval_pass_seconds_at_bound'] == pytest.approx(
      -(-5000 // 4) * detector['bound_seconds'])
  json.dumps(report)
  text = pod_plan.format_report(report)
  assert 'peak' in text and 'images/s per host' in text
  assert 'Evaluation: 5000 images in batches of 4' in text


def test_data_parallel_step_all_reduces_gradients_and_gathers_no_parameters(report):
  collectives = report['train_steps'][0]['collectives']
  assert 'all-gather' not in collectives
  config = _config()
  from retina_jax import models  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(lambda: models.create_model(config).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))['params']
  param_bytes = sum(4 * np.prod(x.shape) for x in jax.tree.leaves(shapes))
  # Every float32 gradient is summed over the data axis once.
  assert collectives['all-reduce']['bytes'] >= param_bytes


def test_breakdown_lists_the_models_convolutions_by_flops(report):
  (step,) = report['train_steps']
  assert len(step['top_by_flops']) == 3
  # The top kernels are convolutions of the model, forward or backward.
  assert all('RetinaNet' in k['op_name'] for k in step['top_by_flops'])


def test_breakdown_by_part_names_every_part_of_the_train_step(report):
  parts = report['train_steps'][0]['by_part']
  for name in ('backbone forward', 'backbone backward', 'fpn forward', 'fpn backward',
               'heads forward', 'heads backward', 'matching', 'loss forward', 'optimizer',
               'collectives'):
    assert parts.get(name, {}).get('kernels', 0) > 0, (name, sorted(parts))
  # The convolutions are the model's: every FLOP counted is in the backbone, FPN or heads.
  model = sum(v['flops'] for k, v in parts.items() if k.split()[0] in ('backbone', 'fpn', 'heads'))
  assert model == pytest.approx(sum(v['flops'] for v in parts.values()))
  assert 'by part' in pod_plan.format_report(report)


def test_matching_never_writes_the_anchor_by_box_iou_matrix():
  """The matcher's IoU stays inside the fused reductions that consume it: compiled for a v5e
  chip, match_batch over 49k anchors x 100 slots x 2 images moves less than one [2, 49k, 100]
  float32 matrix (once it wrote an [N, G, 2] stack and read the IoU matrix four times: 35x)."""
  from retina_jax import matcher, train  # pylint: disable=g-import-not-at-top
  config = tiny_detector.tiny_config(512)
  anchors = jnp.asarray(train.make_anchors(config))
  devices, _ = pod_plan.topology_devices('v5e:2x2')
  replicated = NamedSharding(Mesh(devices[:1], ('x',)), P())
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
  compiled = jax.jit(lambda b, v, c: matcher.match_batch(anchors, b, v, c, config.matcher)).lower(
      spec((2, 100, 4), jnp.float32), spec((2, 100), bool), spec((2, 100), bool)).compile()
  matrix = 2 * anchors.shape[0] * 100 * 4
  assert anchors.shape[0] > 40_000
  assert compiled.cost_analysis()['bytes accessed'] < matrix


def test_kernel_flops_add_up_to_the_cost_analysis():
  devices, _ = pod_plan.topology_devices('v5e:2x2')
  mesh = Mesh(devices, ('x',))
  x = jax.ShapeDtypeStruct((8, 32, 32, 16), jnp.bfloat16, sharding=NamedSharding(mesh, P('x')))
  w = jax.ShapeDtypeStruct((3, 3, 16, 32), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  m = jax.ShapeDtypeStruct((32, 64), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  conv = lambda x, w, m: jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')) @ m
  compiled = jax.jit(conv).lower(x, w, m).compile()
  flops = sum(k.flops for k in hlo_stats.kernels(compiled.as_text()))
  # The TPU compiler tiles the 3x3 convolution with halos, so it does more than the ideal.
  ideal = 2 * 2 * 32 * 32 * (9 * 16 * 32 + 32 * 64)  # 2 images per chip.
  assert ideal <= flops == pytest.approx(compiled.cost_analysis()['flops'], rel=0.02)


def test_a_step_the_compiler_cannot_fit_is_one_line_naming_batch_and_memory():
  devices, _ = pod_plan.topology_devices('v5e:2x2')
  mesh = Mesh(devices, ('data',))
  x = jax.ShapeDtypeStruct((4 * 100_000,), jnp.float32, sharding=NamedSharding(mesh, P('data')))
  lowered = jax.jit(lambda x: jnp.sin(jnp.outer(x, x)).sum(0)).lower(x)
  with pytest.raises(pod_plan.PlanError) as error:
    pod_plan._compile(lowered, 'train step', 400_000, 4)  # pylint: disable=protected-access
  message = str(error.value)
  assert '\n' not in message
  assert 'batch 400000 (100000 per chip)' in message and 'G' in message and 'HBM' in message


def test_a_peak_above_the_hbm_is_one_line_naming_batch_and_memory(report):
  small = dict(report, chip=dict(report['chip'],
                                 hbm_bytes=report['train_steps'][0]['memory']['peak'] // 2))
  with pytest.raises(pod_plan.PlanError, match=r'train step \(64x64\) does not fit: batch 8 '
                     r'\(2 per chip\) '
                     r'needs [\d.]+ GiB per chip'):
    pod_plan.check_fits(small)


def test_unknown_topology_says_what_to_write():
  with pytest.raises(pod_plan.PlanError, match='GENERATION:SHAPE'):
    pod_plan.topology_devices('v9:2x2')


def test_without_a_tpu_chip_jax_starts_on_the_cpu_quietly():
  """What every entry point does first (importing the package chooses nothing)."""
  env = tiny_detector.subprocess_env()
  env.pop('JAX_PLATFORMS', None)
  out = subprocess.run([sys.executable, '-c', 'from retina_jax import cli; cli.skip_absent_tpu(); '
                        'import jax; print(jax.default_backend())'],
                       env=env, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == 'cpu'
  assert 'TPU' not in out.stderr, out.stderr


def test_spatial_partitioning_splits_each_image_over_the_model_axis():
  """config.mesh.model_parallelism = 2 on v5e:2x2: 2 data shards of 2 chips, one image per
  data shard, each chip holding half of its rows: less activation memory per chip than one
  whole image per chip, and a report that says so."""
  config = _config()
  config.data.image_size = config.data.min_size = config.data.max_size = 256
  config.batch_size = config.eval_batch_size = 4
  whole = pod_plan.plan(config, 'v5e:2x2', detector=False)
  config.mesh.model_parallelism = 2
  config.batch_size = 2
  split = pod_plan.plan(config, 'v5e:2x2', detector=False)
  assert split['mesh'] == {'data': 2, 'model': 2} and split['batch_per_chip'] == 0.5
  assert (split['train_steps'][0]['memory']['temporaries']
          < 0.75 * whole['train_steps'][0]['memory']['temporaries'])
  assert 'rows split over 2 chips' in pod_plan.format_report(split)


def test_hbm_floor_counts_what_kernels_move_to_and_from_hbm(report):
  (step,) = report['train_steps']
  assert 0 < step['hbm_floor_bytes'] <= step['bytes_accessed']
  assert step['bound_seconds'] >= step['floor_seconds'] >= step['flops_seconds']


def test_kernel_bytes_leave_out_on_chip_arrays_and_async_aliases():
  devices, _ = pod_plan.topology_devices('v5e:2x2')
  replicated = NamedSharding(Mesh(devices[:1], ('x',)), P())
  x = jax.ShapeDtypeStruct((2048, 2048), jnp.float32, sharding=replicated)
  compiled = jax.jit(lambda x: jnp.exp(x) * 2 + 1).lower(x).compile()
  # One elementwise kernel: reads x and writes the result, 16.8 MB each, once.
  assert sum(k.bytes for k in hlo_stats.kernels(compiled.as_text())) == 2 * 2048 * 2048 * 4
  text = '\n'.join([
      'ENTRY %main (p: f32[100,64]) -> f32[100,64] {',
      '  %p = f32[100,64]{1,0} parameter(0)',
      '  %s = ((f32[100,64]{1,0}), f32[25,64]{1,0:S(1)}, s32[]{:S(2)}) slice-start(%p), '
      'slice={[0:25], [0:64]}',
      '  %d = f32[25,64]{1,0:S(1)} slice-done(%s)',
      '  %c = f32[100,64]{1,0:S(1)} custom-call(%d), custom_call_target="ConcatBitcast"',
      '  ROOT %f = f32[100,64]{1,0} fusion(%c), kind=kLoop, calls=%g',
      '}'])
  moved = {k.opcode: k.bytes for k in hlo_stats.kernels(text)}
  # The prefetch reads its slice from HBM; VMEM-resident arrays cost no HBM traffic.
  assert moved == {'slice-start': 25 * 64 * 4, 'custom-call': 0, 'fusion': 100 * 64 * 4}


def test_bfloat16_train_step_all_reduces_float32_gradients():
  """With bfloat16 activations the kernel gradients are accumulated and summed across the
  data axis in float32 (as torchvision's DDP sums float32 gradients), not in bfloat16."""
  config = _config()
  config.model.dtype = 'bfloat16'
  devices, _ = pod_plan.topology_devices('v5e:2x2')
  mesh = sharding_lib.make_mesh(config, devices)
  model = models.create_model(config, mesh)
  state, tx = train.abstract_train_state(config, model, mesh)
  text = train.make_train_step(config, model, tx, mesh).lower(
      state, train.abstract_batch(config, mesh)).compile().as_text()
  computations, entry = hlo_stats.parse(text)
  dtypes = collections.Counter()
  for inst in computations[entry]:
    if inst.opcode.removesuffix('-start') == 'all-reduce':
      for dtype, dims in hlo_stats._arrays(inst.shape):  # pylint: disable=protected-access
        dtypes[dtype] += int(np.prod(dims))
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  assert dtypes['f32'] >= params * 0.9 and dtypes['bf16'] == 0, dtypes


def _r50(arg='', *overrides):
  return config_lib.from_flags(f'experiments/retinanet_r50_coco.py:{arg}', overrides)


def test_the_canvases_planned_are_the_ones_the_run_trains_and_evaluates_in():
  """No compile: the README's tfds COCO config trains in landscape and portrait canvases (tfds
  lists its image sizes from its size index), as on coco_format."""
  canvases, note = pod_plan.train_canvases(_r50('res=800'))
  assert canvases == [(800, 1344), (1344, 800)] and 'square' not in note
  canvases, note = pod_plan.train_canvases(_r50('res=800', '--config.data.name=coco_format'))
  assert canvases == [(800, 1344), (1344, 800)] and 'square' not in note
  # Multi-scale training holds its largest shorter side; 'square' is S x S wherever.
  assert pod_plan.train_canvases(_r50('res=640,aug=paper', '--config.data.name=coco_format'))[0] == [
      (640, 1088), (1088, 640)]
  assert pod_plan.train_canvases(_r50('', '--config.data.train_buckets=square'))[0] == [
      (1408, 1408)]
  assert pod_plan.train_canvases(_r50('', '--config.data.name=coco_format',
                                      '--config.data.train_buckets=torchvision'))[0] == [
      (800, 1344), (1344, 800)]
  assert pod_plan.eval_canvases(_r50()) == [(800, 1344), (1344, 800)]
  assert pod_plan.eval_canvases(_r50('', '--config.data.eval_buckets=torchvision')) == [
      (800, 1344), (1344, 800)]
  assert pod_plan.eval_canvases(_r50('', '--config.data.eval_buckets=square')) == [(1408, 1408)]


def _no_compile(*args):
  raise AssertionError('compiled a program that a check before compiling refuses')


def test_the_readme_command_plans_the_detector_at_an_eval_batch_the_pod_splits(monkeypatch):
  """The README's v5e:4x4 command at the default eval batch (once 8, which 16 chips cannot
  split) is planned at 16; an eval batch set by hand that the pod cannot split is refused in
  seconds, before any compile."""
  assert pod_plan.sizes.check(_r50('res=800,batch=64'), 16, 4).eval_batch_size == 16
  monkeypatch.setattr(pod_plan, '_compile', _no_compile)
  with pytest.raises(pod_plan.PlanError) as error:
    pod_plan.plan(_r50('res=800,batch=64', '--config.eval_batch_size=8'), 'v5e:4x4')
  message = str(error.value)
  assert '\n' not in message and message.startswith(
      'config.eval_batch_size=8 must be a multiple of the data-parallel size 16')
  assert 'e.g. --config.eval_batch_size=16' in message and '16 chips, 4 hosts' in message
  with pytest.raises(pod_plan.PlanError, match='config.batch_size=24 must be a multiple'):
    pod_plan.plan(_r50('res=800,batch=24'), 'v5e:4x4', detector=False)


def test_a_train_state_larger_than_the_hbm_is_refused_before_compiling(monkeypatch):
  monkeypatch.setattr(pod_plan, '_compile', _no_compile)
  monkeypatch.setitem(pod_plan.CHIPS, 'v5e', dataclasses.replace(pod_plan.CHIPS['v5e'],
                                                                 hbm_bytes=2 ** 20))
  with pytest.raises(pod_plan.PlanError) as error:
    pod_plan.plan(_config(), 'v5e:2x2')
  assert str(error.value).startswith('the train state does not fit: ')
  assert 'GiB per chip' in str(error.value) and '\n' not in str(error.value)


# The shapes demo's sweep (Table 1b on shapes: 5 members fused in one program) made small enough
# to compile in seconds: 64 px, batch 4, the tiny model's narrow FPN and heads.
_SMALL_SWEEP = ['--config.data.image_size=64', '--config.data.min_size=64',
                '--config.data.max_size=64', '--config.batch_size=4', '--config.eval_batch_size=4',
                '--config.model.fpn_channels=16', '--config.model.head_channels=16',
                '--config.model.head_convs=1', '--config.data.max_boxes=8']


def _plan_sweep(*flags):
  return subprocess.run(
      [sys.executable, '-m', 'retina_jax.tools.pod_plan', '--sweep',
       'experiments/smoke/shapes_demo.py', *_SMALL_SWEEP, *flags],
      env=tiny_detector.subprocess_env(), cwd=tiny_detector.REPO_ROOT, capture_output=True,
      text=True, timeout=600, check=False)


@pytest.mark.slow
def test_a_fused_sweep_is_planned_on_the_pod_against_its_members_run_alone():
  out = _plan_sweep('--topology', 'v5e:2x2', '--json')
  assert out.returncode == 0, out.stderr[-2000:]
  r = json.loads(out.stdout)
  assert len(r['members']) == 5 and r['chips'] == 4 and len(r['groups']) == 1
  (group,) = r['groups']
  assert group['num_members'] == 5 and group['mesh'] == {'data': 4, 'model': 1}
  assert group['member_images_per_chip'] == 5 * 4 / 4
  (step,) = group['train_steps']
  assert step['canvas'] == [64, 64]
  assert 0 < group['state_bytes_per_chip'] <= step['memory']['arguments']
  assert 0 < step['memory']['peak'] < r['chip']['hbm_bytes']
  assert step['bound_seconds'] == max(step['flops_seconds'], step['bytes_seconds']) > 0
  assert group['hours_at_bound'] == pytest.approx(1200 * step['bound_seconds'] / 3600)
  # Alone, batch 4 fills the 4 chips of v5e:2x2 with one image each; five runs in a row.
  separate = group['separate']
  assert separate['topology'] == 'v5e:2x2' and separate['mesh'] == {'data': 4, 'model': 1}
  alone = separate['train_steps'][0]['bound_seconds']
  assert separate['hours_at_bound'] == pytest.approx(5 * 1200 * alone / 3600)
  assert r['fused_chip_hours_at_bound'] == pytest.approx(4 * group['hours_at_bound'])
  assert r['separate_chip_hours_at_bound'] == pytest.approx(4 * separate['hours_at_bound'])
  assert r['chip_hours_at_bound_ratio'] == pytest.approx(
      r['fused_chip_hours_at_bound'] / r['separate_chip_hours_at_bound'])
  assert r['fused_chip_hours_at_mfu'] >= r['fused_chip_hours_at_bound']
  # Each member's model runs: several times one member's FLOPs per chip (XLA counts 4.0x for
  # the 5 members: the batch's matching is shared).
  assert step['flops'] > 3 * separate['train_steps'][0]['flops']
  text = pod_plan.format_sweep_report(r)
  assert '5 members fused in one program' in text and 'fused / separate chip-hours' in text


@pytest.mark.slow
def test_a_fused_sweep_whose_members_cannot_tile_the_pod_is_refused_in_one_line():
  out = _plan_sweep('--topology', 'v5e:2x2', '--config.mesh.sweep_parallelism=2')
  assert out.returncode == 1 and not out.stdout
  (line,) = [l for l in out.stderr.splitlines() if l.startswith('pod_plan:')]
  assert line.startswith('pod_plan: 5 fused members: config.mesh.sweep_parallelism=2 must divide '
                         'the number of fused members (5)')
  assert line.endswith('a config.mesh that tiles: --config.mesh.model_parallelism=1 '
                       '--config.mesh.sweep_parallelism=1')


def test_the_focal_sweeps_layouts_and_separate_slices_follow_the_size_rules():
  """No compile: Table 1b's 7 members at batch 16 tile v5e:8x8 (64 chips, 16 hosts of 4) only
  with each image over 4 chips, and nothing tiles v5e:8x16; alone, batch 16 fills v5e:4x4."""
  names, configs = pod_plan.sweep_members('experiments/focal_sweep.py:table=1b')
  assert len(names) == 7 and configs[0].batch_size == 16
  assert pod_plan.fused_layouts(configs[0], 7, 64, 16) == [
      '--config.mesh.model_parallelism=4 --config.mesh.sweep_parallelism=1']
  assert pod_plan.fused_layouts(configs[0], 7, 128, 32) == []
  assert pod_plan.separate_topology(configs[0], 'v5e') == 'v5e:4x4'
  assert pod_plan.separate_topology(configs[0], 'v4') == 'v4:2x2x4'
