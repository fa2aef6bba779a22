"""Will this config fit on that TPU pod, and how long will its schedule take? From any machine.

  python -m retina_jax.tools.pod_plan --config experiments/<file>.py[:arg] --topology v5e:16x16 \
      [--config.x=y ...] [--json] [--breakdown] [--mfu 0.4] [--nodetector] [--eval_images 5000]
  python -m retina_jax.tools.pod_plan --sweep experiments/<file>.py[:arg] --topology v5e:8x8 \
      [--config.x=y ...] [--json] [--breakdown] [--mfu 0.4]

First, within seconds and without compiling, the size rules of `retina_jax.sizes` are checked
for the pod's chips and hosts, as the run checks them at start-up (the batches, the mesh, the
canvases), and the train state against a chip's HBM: a run that cannot start is refused with one
line, exit 1. Then it compiles, ahead of time, for the compile-only devices of the TPU topology
(the TPU runtime of requirements-tpu.txt; no TPU attached: JAX itself runs on the CPU) the train
step that `retina_jax.main` runs (`train.abstract_train_state`, `abstract_batch`,
`make_train_step` over `sharding.make_mesh` of the topology's chips) in each canvas the run
trains in (`train_canvases`: config.data.train_buckets as the data source allows it), and the
evaluation detector (`evaluator.sharded_detect`) at the eval batch the run uses in each canvas
it evaluates in (config.data.eval_buckets), and prints, per chip: the memory (arguments,
temporaries, peak) against the chip's HBM, the FLOPs and bytes XLA's cost analysis counts per
step, the roofline bound on the step time (max of FLOPs / peak bf16 FLOP/s and bytes / HBM
bandwidth, CHIPS below), images/s per chip at that bound, a floor from the HBM traffic at kernel
boundaries instead (XLA's bytes count what stays in on-chip VMEM too: 14 of its 64 GB per step
are HBM traffic for R50 at 800 px, see benchmarks/RESULTS.md), the collectives, the images/s
each host's input pipeline must deliver to keep up with the bound, num_train_steps at the bound
and at `--mfu` (FLOPs / (peak x MFU), never below the bound; the slowest canvas), and the
detector's time for one evaluation pass of --eval_images images at the bound.
Every figure is an ahead-of-time-compile estimate or bound, not a measurement; collectives' ICI
time, the input pipeline and the host's COCO metric are not in the bound. Exits 1 with one line
naming the batch and the memory when a program does not fit.

--sweep plans what `scripts/sweep.py FILE[:ARG] --fused -- --config.x=y ...` trains instead: the
groups of fusable members (`fused.plan`, every member starting afresh) and, per group, the size
rules the fused run checks (members over config.mesh.sweep_parallelism, each member's batch over
the rest of the chips; a group that cannot tile the pod is refused with one line, exit 1, naming
a config.mesh that tiles where one exists), its vmapped train step (`fused.make_train_step` on
the stacked state, `fused.abstract_states`) compiled for the pod in each canvas, the memory,
FLOPs and bound per chip as above, and the sweep's hours and chip-hours (chips x hours) against
the same members run one after another, each alone on the slice of the same generation that its
batch fills with one image per chip (`separate_topology`: v5e:4x4 for batch 16). The evaluation
detector is not compiled there (each member evaluates as its own run does).
"""

import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from retina_jax import cli
from retina_jax import config as config_lib
from retina_jax import fused
from retina_jax import hyper
from retina_jax import models
from retina_jax import sharding as sharding_lib
from retina_jax import sizes
from retina_jax import train
from retina_jax.data import augment
from retina_jax.data import canvas as canvas_lib
from retina_jax.data import resize
from retina_jax.evaluation import evaluator
from retina_jax.tools import hlo_stats

GIB = 2 ** 30
_TOP = 12  # Kernels listed by --breakdown.


@dataclasses.dataclass(frozen=True)
class Chip:
  peak_bf16_flops: float  # FLOP/s.
  hbm_bytes: int
  hbm_bandwidth: float  # Bytes/s.
  megacore: bool  # Two TensorCores as one device (v4, v5p), as their pods run.
  source: str


# The chips' datasheet figures ("System architecture" of each generation's page).
CHIPS = {
    'v4': Chip(275e12, 32 * GIB, 1200e9, True, 'https://cloud.google.com/tpu/docs/v4'),
    'v5e': Chip(197e12, 16 * GIB, 819e9, False, 'https://cloud.google.com/tpu/docs/v5e'),
    'v5p': Chip(459e12, 95 * GIB, 2765e9, True, 'https://cloud.google.com/tpu/docs/v5p'),
    'v6e': Chip(918e12, 32 * GIB, 1638e9, False, 'https://cloud.google.com/tpu/docs/v6e'),
}


class PlanError(Exception):
  """A one-line reason the plan cannot be made or the step does not fit."""


def topology_devices(topology: str) -> tuple[list, Chip]:
  """The compile-only devices of e.g. 'v5e:16x16' (one per chip) and the chip's figures."""
  generation = topology.partition(':')[0]
  if generation not in CHIPS or ':' not in topology:
    raise PlanError(f'--topology={topology!r}: write GENERATION:SHAPE with a generation of '
                    f'{sorted(CHIPS)}, e.g. v5e:16x16 (v5e-256) or v4:2x2x4 (v4-32)')
  if importlib.util.find_spec('libtpu') is None:
    raise PlanError('the TPU runtime is not installed: pip install -r requirements-tpu.txt')
  # libtpu takes a machine-wide lock unless told otherwise, so that a second process (a
  # parallel test, another plan) would fail; compile-only use needs no exclusive TPU.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {'chip_config_name': 'megacore'} if CHIPS[generation].megacore else {}
  try:
    desc = topologies.get_topology_desc(platform='tpu', topology_name=topology, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise PlanError(f'--topology={topology!r}: the TPU runtime rejects it: '
                    f'{str(e).splitlines()[0]}') from e
  return desc.devices, CHIPS[generation]


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  peak = getattr(m, 'peak_memory_in_bytes', 0) or (
      m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
      + m.temp_size_in_bytes)
  return {'arguments': int(m.argument_size_in_bytes), 'outputs': int(m.output_size_in_bytes),
          'aliased': int(m.alias_size_in_bytes), 'temporaries': int(m.temp_size_in_bytes),
          'peak': int(peak)}


# The TPU compiler's two wordings of an HBM overflow: (needed, available).
_OOM = (re.compile(r'Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm'),
        re.compile(r'\(([\d.]+[KMGT]?)\) exceeds available HBM \(([\d.]+[KMGT]?)\)'))


def _compile(lowered, what: str, batch: int, chips: int):
  """lowered.compile(), with the TPU compiler's out-of-memory error as one PlanError line."""
  try:
    return lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    message = str(e)
    if 'RESOURCE_EXHAUSTED' not in message and 'Ran out of memory' not in message:
      raise
    used = next((m for m in (p.search(message) for p in _OOM) if m), None)
    amount = (f'{used.group(1)}B, more than the {used.group(2)}B of HBM the compiler has'
              if used else 'more than its HBM')
    raise PlanError(f'the {what} does not fit: batch {batch} ({batch / chips:g} per chip) '
                    f'needs {amount} per chip; lower the batch or raise '
                    'config.mesh.model_parallelism') from e


def _program(compiled, chip: Chip, images_per_chip: float, breakdown: int) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops, moved = float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0))
  flop_s, byte_s = flops / chip.peak_bf16_flops, moved / chip.hbm_bandwidth
  bound = max(flop_s, byte_s)
  text = compiled.as_text()
  kernels = hlo_stats.kernels(text)
  # The HBM traffic the kernels' boundaries imply (hlo_stats.kernels): a floor, where XLA's
  # 'bytes accessed' also counts what stays on chip; the bound above uses XLA's figure.
  floor_bytes = float(sum(k.bytes for k in kernels))
  floor = max(flop_s, floor_bytes / chip.hbm_bandwidth)
  result = {
      'memory': _memory(compiled),
      'flops': flops, 'bytes_accessed': moved,
      'bound_seconds': bound, 'flops_seconds': flop_s, 'bytes_seconds': byte_s,
      'bound_by': 'FLOPs' if flop_s >= byte_s else 'HBM bandwidth',
      'images_per_second_per_chip': images_per_chip / bound if bound else 0.0,
      'hbm_floor_bytes': floor_bytes, 'floor_seconds': floor,
      'floor_by': 'FLOPs' if floor == flop_s else 'HBM bandwidth',
      'collectives': hlo_stats.collectives(text),
  }
  if breakdown:
    top = lambda key: [dataclasses.asdict(k) for k in
                       sorted(kernels, key=key, reverse=True)[:breakdown]]
    result['top_by_bytes'] = top(lambda k: k.bytes)
    result['top_by_flops'] = top(lambda k: k.flops)
    result['by_part'] = hlo_stats.by_part(kernels)
  return result


def train_canvases(config) -> tuple[list[tuple[int, int]], str]:
  """The canvases the run will train in, and a note on how they follow from the config.

  'square': S x S. 'orientation': the landscape and the portrait canvas. 'torchvision': the
  largest landscape and portrait canvases (those of an image with the resize rule's both sides
  at their caps; the run also trains in smaller ones). Multi-scale training holds its largest
  shorter side (augment.largest_min_size).
  """
  data = config.data  # Every source lists its image sizes (tfds from its size index).
  buckets, note = data.train_buckets, f'config.data.train_buckets={data.train_buckets!r}'
  largest = augment.largest_min_size(data)
  longest = int(data.max_size)
  canvases = [canvas_lib.canvas_for(data, h, w, buckets, largest)
              for h, w in ((largest, longest), (longest, largest))]
  if buckets == 'torchvision':
    note += ': the largest canvases, the run also trains in smaller ones'
  return list(dict.fromkeys(canvases)), note


def eval_canvases(config) -> list[tuple[int, int]]:
  """The canvases the detector runs in (config.data.eval_buckets); under 'torchvision', whose
  canvas follows each image, the largest ones, which are the 'orientation' canvases."""
  canvases = canvas_lib.eval_canvases(config.data)
  if not canvases:
    return [canvas_lib.canvas_for(config.data, *hw, 'orientation') for hw in ((1, 2), (2, 1))]
  return list(dict.fromkeys(canvases.values()))


def _state_bytes(state) -> int:
  """Bytes per chip of the train state (parameters, batch statistics, optimizer state)."""
  return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                 for x in jax.tree.leaves(state)))


def _check_state(state, chip: Chip, topology: str, what: str = 'the train state') -> int:
  """Bytes per chip of `state`; raises PlanError when they alone outgrow a chip's HBM."""
  state_bytes = _state_bytes(state)
  if state_bytes > chip.hbm_bytes:
    raise PlanError(f'{what} does not fit: {state_bytes / GIB:.2f} GiB per chip '
                    f'(parameters and optimizer state, replicated), more than the '
                    f'{chip.hbm_bytes / GIB:.0f} GiB of HBM of {topology}; choose a smaller '
                    'model (config.model) or a chip with more HBM')
  return state_bytes


def _schedule_hours(steps: int, programs: list[dict], chip: Chip, mfu: float
                    ) -> tuple[float, float]:
  """Hours of `steps` steps of the slowest of `programs` (train steps, one per canvas): at the
  roofline bound, and at `mfu`."""
  # The canvases' mix depends on the data: the slowest canvas bounds the schedule from above.
  slowest = max(programs, key=lambda p: p['bound_seconds'])
  # A step cannot beat its roofline bound, whatever share of the peak FLOP/s it reaches.
  at_mfu = max(slowest['flops'] / (chip.peak_bf16_flops * mfu), slowest['bound_seconds'])
  return steps * slowest['bound_seconds'] / 3600, steps * at_mfu / 3600


def plan(config, topology: str, *, mfu: float = 0.4, detector: bool = True,
         breakdown: int = 0, eval_images: int = 5000) -> dict:
  """Compiles the train step in each canvas the run trains in (and the detector in each canvas
  it evaluates in, at the eval batch the run uses) for `topology`; the report as a dict.

  Raises PlanError, before compiling, when a size rule fails on the pod (`sizes.check`) or the
  train state alone outgrows a chip's HBM, and when the compiler finds that a program does not
  fit; `check_fits` compares the peaks it reports with the HBM.
  """
  devices, chip = topology_devices(topology)
  chips, hosts = len(devices), len({d.process_index for d in devices})
  try:
    checked = sizes.check(config, chips, hosts, evaluate=detector)
  except sizes.SizeError as e:
    raise PlanError(f'{e} ({topology}: {chips} chips, {hosts} hosts)') from e
  mesh = sharding_lib.make_mesh(config, devices)
  batch = config.batch_size
  canvases, canvas_note = train_canvases(config)
  report = {'topology': topology, 'device_kind': devices[0].device_kind, 'chips': chips,
            'hosts': hosts, 'mesh': dict(mesh.shape), 'batch_size': batch,
            'batch_per_chip': batch / chips, 'batch_per_host': batch // hosts,
            'eval_batch_size': checked.eval_batch_size, 'train_canvases_rule': canvas_note,
            'chip': dataclasses.asdict(chip), 'mfu': mfu, 'num_train_steps':
            config.num_train_steps}
  model = models.create_model(config, mesh)
  state, tx = train.abstract_train_state(config, model, mesh)
  report['state_bytes_per_chip'] = _check_state(state, chip, topology)
  step_fn = train.make_train_step(config, model, tx, mesh)
  report['train_steps'] = []
  for canvas in canvases:
    t0 = time.perf_counter()
    lowered = step_fn.lower(state, train.abstract_batch(config, mesh, canvas))
    step = _program(_compile(lowered, f'train step ({canvas[0]}x{canvas[1]})', batch, chips),
                    chip, batch / chips, breakdown)
    step['canvas'] = list(canvas)
    step['compile_seconds'] = time.perf_counter() - t0
    # What each host's input pipeline must deliver for the chips to run at the bound.
    step['input_images_per_second_per_host'] = (batch / hosts / step['bound_seconds']
                                                if step['bound_seconds'] else 0.0)
    report['train_steps'].append(step)
  report['schedule_hours_at_bound'], report['schedule_hours_at_mfu'] = _schedule_hours(
      config.num_train_steps, report['train_steps'], chip, mfu)
  report['input_images_per_second_per_host'] = max(
      p['input_images_per_second_per_host'] for p in report['train_steps'])
  if detector:
    eval_batch = checked.eval_batch_size
    split = sharding_lib.batch_sharding(mesh)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    detect_fn = evaluator.sharded_detect(sizes.with_eval_batch(config, eval_batch), mesh)
    report['detectors'] = []
    for canvas in eval_canvases(config):
      t0 = time.perf_counter()
      lowered = detect_fn.lower(
          variables,
          jax.ShapeDtypeStruct((eval_batch, *canvas, 3), resize.image_dtype(config.data),
                               sharding=split),
          jax.ShapeDtypeStruct((eval_batch, 2), jnp.int32, sharding=split))
      detect = _program(_compile(lowered, f'detector ({canvas[0]}x{canvas[1]})', eval_batch,
                                 chips), chip, eval_batch / chips, breakdown)
      detect['canvas'] = list(canvas)
      detect['compile_seconds'] = time.perf_counter() - t0
      report['detectors'].append(detect)
    # Every eval batch is padded to eval_batch images; the host's COCO metric is not in it.
    batches = -(-eval_images // eval_batch)
    report['eval_images'] = eval_images
    report['eval_pass_seconds_at_bound'] = batches * max(
        p['bound_seconds'] for p in report['detectors'])
  return report


def check_fits(report: dict):
  """Raises PlanError when a program's peak memory per chip exceeds the chip's HBM."""
  hbm, chips = report['chip']['hbm_bytes'], report['chips']
  for what, batch in (('train_steps', report['batch_size']),
                      ('detectors', report.get('eval_batch_size', 0))):
    for program in report.get(what, ()):
      if program['memory']['peak'] > hbm:
        peak = program['memory']['peak'] / GIB
        h, w = program['canvas']
        raise PlanError(
            f'the {"train step" if what == "train_steps" else "detector"} ({h}x{w}) does not '
            f'fit: batch {batch} ({batch / chips:g} per chip) needs {peak:.2f} GiB per chip, more '
            f'than the {hbm / GIB:.0f} GiB of HBM of {report["topology"]}; lower the batch or '
            'raise config.mesh.model_parallelism')


def _hours(h: float) -> str:
  return f'{h * 60:.0f} min' if h < 1 else f'{h:.1f} h'


def format_report(r: dict) -> str:
  chip = r['chip']
  lines = [
      f"{r['topology']} ({r['device_kind']}): {r['chips']} chips, {r['hosts']} hosts, mesh "
      f"{r['mesh']}; batch {r['batch_size']} = {r['batch_per_chip']:g} per chip, "
      f"{r['batch_per_host']} per host" + (
          f"; each image's rows split over {r['mesh']['model']} chips (spatial partitioning)."
          if r['mesh'].get('model', 1) > 1 else '.'),
      f"Chip: {chip['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16, {chip['hbm_bytes'] / GIB:.0f} "
      f"GiB HBM at {chip['hbm_bandwidth'] / 1e9:.0f} GB/s ({chip['source']}).",
      'All figures: ahead-of-time compile estimates / bounds per chip, not measurements.',
      f"Training canvases: {', '.join(f'{h}x{w}' for h, w in (p['canvas'] for p in r['train_steps']))}"
      f" ({r['train_canvases_rule']}); eval batch {r.get('eval_batch_size')}."]
  programs = [('train step', p) for p in r['train_steps']] + [
      ('detector', p) for p in r.get('detectors', ())]
  for what, p in programs:
    m = p['memory']
    collectives = ', '.join(f"{k} x{v['count']} ({v['bytes'] / 1e6:.1f} MB)"
                            for k, v in p['collectives'].items()) or 'none'
    lines += [
        f"{what} ({p['canvas'][0]}x{p['canvas'][1]}, compiled in "
        f"{p['compile_seconds']:.0f} s):",
        f"  memory per chip: arguments {m['arguments'] / GIB:.2f} GiB, temporaries "
        f"{m['temporaries'] / GIB:.2f} GiB, peak {m['peak'] / GIB:.2f} GiB of "
        f"{chip['hbm_bytes'] / GIB:.0f} GiB",
        f"  per chip per step: {p['flops'] / 1e12:.3g} TFLOP, {p['bytes_accessed'] / 1e9:.3g} GB "
        f"accessed",
        f"  roofline bound: {p['bound_seconds'] * 1e3:.1f} ms per step (FLOPs "
        f"{p['flops_seconds'] * 1e3:.1f} ms, HBM {p['bytes_seconds'] * 1e3:.1f} ms: bound by "
        f"{p['bound_by']}), {p['images_per_second_per_chip']:.1f} images/s per chip",
        f"  floor from the HBM traffic at kernel boundaries ({p['hbm_floor_bytes'] / 1e9:.3g} GB, "
        f"XLA's bytes less what stays on chip): {p['floor_seconds'] * 1e3:.1f} ms per step, "
        f"bound by {p['floor_by']}",
        f"  collectives: {collectives}"]
    if 'by_part' in p:
      counted = sum(v['bytes'] for v in p['by_part'].values())
      lines.append(f'  by part (HBM bytes at kernel boundaries: {counted / 1e9:.3g} GB in all, where '
                   f'XLA\'s cost analysis counts {p["bytes_accessed"] / 1e9:.3g} GB):')
      lines += [f"    {v['bytes'] / 1e9:8.3f} GB {v['flops'] / 1e9:9.1f} GFLOP {v['kernels']:6d} "
                f"kernels  {name}" for name, v in p['by_part'].items()]
    for key, unit in (('top_by_bytes', 'bytes'), ('top_by_flops', 'flops')):
      if key in p:
        lines.append(f'  top kernels by {unit} (HBM bytes at their boundary; FLOPs of their '
                     'convs/dots):')
        lines += [f"    {k['bytes'] / 1e9:8.3f} GB {k['flops'] / 1e9:9.1f} GFLOP  {k['opcode']} "
                  f"{k['op_name'] or k['name']}" for k in p[key]]
    if 'input_images_per_second_per_host' in p:
      lines.append(f"  input at the bound: {p['input_images_per_second_per_host']:.0f} images/s "
                   f"per host ({r['batch_per_host']} per host per step) to decode and augment")
  lines.append(f"Schedule: {r['num_train_steps']} steps: {_hours(r['schedule_hours_at_bound'])} "
               f"at the bound, {_hours(r['schedule_hours_at_mfu'])} at {r['mfu']:.0%} MFU (the "
               "slowest training canvas); each host's input pipeline must keep up with "
               f"{r['input_images_per_second_per_host']:.0f} images/s.")
  if 'eval_pass_seconds_at_bound' in r:
    lines.append(f"Evaluation: {r['eval_images']} images in batches of {r['eval_batch_size']}: "
                 f"{r['eval_pass_seconds_at_bound']:.1f} s of detector per pass at the bound "
                 "(the slowest eval canvas; the COCO metric on the hosts comes on top).")
  return '\n'.join(lines)


# The slices of each generation, fewest chips first, as `topology_devices` takes their shapes:
# where the separate runs of a planned sweep go (`separate_topology`).
SLICES = {
    'v4': ('2x2x1', '2x2x2', '2x2x4', '2x4x4', '4x4x4', '4x4x8', '4x8x8', '8x8x8'),
    'v5e': ('1x1', '2x2', '2x4', '4x4', '4x8', '8x8', '8x16', '16x16'),
    'v5p': ('2x2x1', '2x2x2', '2x2x4', '2x4x4', '4x4x4', '4x4x8', '4x8x8', '8x8x8'),
    'v6e': ('1x1', '2x2', '2x4', '4x4', '4x8', '8x8', '8x16', '16x16'),
}


def separate_topology(config, generation: str) -> str:
  """Where one member of a sweep runs alone, one whole image per chip: the largest slice of
  `generation` whose chips divide config.batch_size (v5e:4x4, 16 chips, for batch 16)."""
  for shape in reversed(SLICES[generation]):
    if config.batch_size % math.prod(int(n) for n in shape.split('x')) == 0:
      return f'{generation}:{shape}'
  raise PlanError(f'config.batch_size={config.batch_size} splits over no slice of {generation}')


def sweep_members(spec: str, overrides=()) -> tuple[list[str], list]:
  """(setting names, configs) of the experiment's sweep, each config as its own run builds it
  with the `--config.x=y` `overrides` (a setting listed twice counts once, as in
  scripts/sweep.py --fused)."""
  settings = {}
  for setting in config_lib.load_sweep(spec):
    settings.setdefault(hyper.setting_name(setting), setting)
  return list(settings), config_lib.sweep_configs(spec, list(settings.values()), overrides)


def _with_mesh(config, **mesh):
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh.update(mesh)
  return config


def fused_layouts(config, members: int, chips: int, hosts: int) -> list[str]:
  """The config.mesh flags under which a fused group of `members` members of `config` passes
  the size rules on the pod, fewest chips per image first, then most members apart."""
  layouts = []
  for model in (d for d in range(1, chips + 1) if chips % d == 0):
    for sweep in sorted((d for d in range(1, members + 1) if members % d == 0), reverse=True):
      try:
        sizes.check(_with_mesh(config, model_parallelism=model, sweep_parallelism=sweep), chips,
                    hosts, members=members)
      except sizes.SizeError:
        continue
      layouts.append(f'--config.mesh.model_parallelism={model} '
                     f'--config.mesh.sweep_parallelism={sweep}')
  return layouts


def _plan_group(config, names: list[str], devices, chip: Chip, topology: str, mfu: float,
                breakdown: int) -> dict:
  """The fused step of one group on the pod, and its members run one after another alone."""
  chips, hosts, members = len(devices), len({d.process_index for d in devices}), len(names)
  batch = config.batch_size
  try:
    # The rules the fused run checks at start-up (fused.train_and_evaluate; it evaluates too).
    sizes.check(config, chips, hosts, members=members)
  except sizes.SizeError as e:
    layouts = fused_layouts(config, members, chips, hosts)
    hint = (f'; a config.mesh that tiles: {layouts[0]}' if layouts else
            f'; no config.mesh.model_parallelism x sweep_parallelism tiles {members} members '
            f'at batch {batch} on it')
    raise PlanError(f'{members} fused members: {e} ({topology}: {chips} chips, {hosts} '
                    f'hosts){hint}') from e
  mesh = fused.make_mesh(config, members, devices)
  model = models.create_model(config, mesh)
  states = fused.abstract_states(config, model, mesh, members)
  group = {'members': names, 'num_members': members, 'mesh': dict(mesh.shape),
           'batch_size': batch, 'member_images_per_chip': members * batch / chips,
           'num_train_steps': config.num_train_steps,
           'state_bytes_per_chip': _check_state(states, chip, topology,
                                                f'the state of {members} fused members')}
  step_fn = fused.make_train_step(config, model, mesh)
  numbers = fused.abstract_hparams(members, mesh)
  group['train_steps'] = []
  for canvas in train_canvases(config)[0]:
    t0 = time.perf_counter()
    lowered = step_fn.lower(states, train.abstract_batch(config, mesh, canvas), numbers)
    what = f'fused train step of {members} members ({canvas[0]}x{canvas[1]})'
    step = _program(_compile(lowered, what, batch, chips), chip, members * batch / chips,
                    breakdown)
    step['canvas'] = list(canvas)
    step['compile_seconds'] = time.perf_counter() - t0
    group['train_steps'].append(step)
  try:
    check_fits({'chip': dataclasses.asdict(chip), 'chips': chips, 'batch_size': batch,
                'topology': topology, 'train_steps': group['train_steps']})
  except PlanError as e:
    raise PlanError(f'{members} fused members: {e}') from e
  group['hours_at_bound'], group['hours_at_mfu'] = _schedule_hours(
      config.num_train_steps, group['train_steps'], chip, mfu)
  # Alone: members of one group differ only in traced numbers, so one plan is every member's.
  alone = separate_topology(config, topology.partition(':')[0])
  try:
    single = plan(_with_mesh(config, model_parallelism=1), alone, mfu=mfu, detector=False)
    check_fits(single)
  except PlanError as e:
    group['separate'] = {'topology': alone, 'error': str(e)}
    return group
  group['separate'] = {
      'topology': alone, 'chips': single['chips'], 'hosts': single['hosts'],
      'mesh': single['mesh'], 'train_steps': single['train_steps'],
      'hours_at_bound': members * single['schedule_hours_at_bound'],
      'hours_at_mfu': members * single['schedule_hours_at_mfu']}
  return group


def plan_sweep(spec: str, topology: str, overrides=(), *, mfu: float = 0.4,
               breakdown: int = 0) -> dict:
  """Plans `scripts/sweep.py SPEC --fused -- OVERRIDES` on `topology`: its fused groups
  (`fused.plan`, every member starting afresh), each group's vmapped train step compiled for the
  pod's chips in each canvas it trains in, and the sweep's hours and chip-hours against the same
  members run one after another, each alone on the slice its batch fills (`separate_topology`,
  whole images, one per chip). The evaluation detector is left out (each member evaluates as
  its own run does). Raises PlanError (one line) as `plan` does, and when a group's members and
  batch cannot tile the pod, naming a config.mesh that does where one exists.
  """
  try:
    names, configs = sweep_members(spec, overrides)
  except ValueError as e:
    raise PlanError(str(e)) from e
  devices, chip = topology_devices(topology)
  chips, hosts = len(devices), len({d.process_index for d in devices})
  indices, why = fused.plan(configs)
  report = {'sweep': spec, 'overrides': list(overrides), 'topology': topology,
            'device_kind': devices[0].device_kind, 'chips': chips, 'hosts': hosts,
            'chip': dataclasses.asdict(chip), 'mfu': mfu, 'members': names, 'grouping': why,
            'groups': []}
  for group in indices:
    report['groups'].append(_plan_group(configs[group[0]], [names[i] for i in group], devices,
                                        chip, topology, mfu, breakdown))
  for key in ('hours_at_bound', 'hours_at_mfu'):
    # The groups, and the separate runs, go one after another.
    fused_hours = sum(g[key] for g in report['groups'])
    report[f'fused_{key}'] = fused_hours
    report[f'fused_chip_{key}'] = chips * fused_hours
    separate = [g['separate'] for g in report['groups']]
    if all('error' not in s for s in separate):
      report[f'separate_{key}'] = sum(s[key] for s in separate)
      report[f'separate_chip_{key}'] = sum(s['chips'] * s[key] for s in separate)
      report[f'chip_{key}_ratio'] = (report[f'fused_chip_{key}']
                                     / report[f'separate_chip_{key}'])
  return report


def format_sweep_report(r: dict) -> str:
  chip = r['chip']
  lines = [
      f"Fused sweep {r['sweep']}" + (f" ({' '.join(r['overrides'])})" if r['overrides'] else '')
      + f" on {r['topology']} ({r['device_kind']}): {r['chips']} chips, {r['hosts']} hosts; "
      f"{r['grouping']}.",
      f"Chip: {chip['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16, {chip['hbm_bytes'] / GIB:.0f} "
      f"GiB HBM at {chip['hbm_bandwidth'] / 1e9:.0f} GB/s ({chip['source']}).",
      'All figures: ahead-of-time compile estimates / bounds per chip, not measurements; every '
      'member starts afresh; the evaluations are not counted.']
  for g_index, g in enumerate(r['groups']):
    lines.append(f"Group {g_index + 1}: {g['num_members']} members ({', '.join(g['members'])}), "
                 f"mesh {g['mesh']}, batch {g['batch_size']} each: "
                 f"{g['member_images_per_chip']:g} member-images per chip per step; state "
                 f"{g['state_bytes_per_chip'] / GIB:.2f} GiB per chip.")
    for p in g['train_steps']:
      m = p['memory']
      lines += [
          f"  fused train step ({p['canvas'][0]}x{p['canvas'][1]}, compiled in "
          f"{p['compile_seconds']:.0f} s): memory per chip: arguments {m['arguments'] / GIB:.2f} "
          f"GiB, temporaries {m['temporaries'] / GIB:.2f} GiB, peak {m['peak'] / GIB:.2f} GiB "
          f"of {chip['hbm_bytes'] / GIB:.0f} GiB",
          f"    per chip per step: {p['flops'] / 1e12:.3g} TFLOP, "
          f"{p['bytes_accessed'] / 1e9:.3g} GB accessed; roofline bound "
          f"{p['bound_seconds'] * 1e3:.1f} ms (bound by {p['bound_by']}), "
          f"{p['images_per_second_per_chip']:.1f} member-images/s per chip"]
    lines.append(f"  {g['num_train_steps']} steps fused: {_hours(g['hours_at_bound'])} at the "
                 f"bound, {_hours(g['hours_at_mfu'])} at {r['mfu']:.0%} MFU.")
    s = g['separate']
    if 'error' in s:
      lines.append(f"  alone on {s['topology']}: not planned: {s['error']}")
      continue
    p = max(s['train_steps'], key=lambda p: p['bound_seconds'])
    lines.append(f"  alone, one after another, each on {s['topology']} ({s['chips']} chips, mesh "
                 f"{s['mesh']}): step bound {p['bound_seconds'] * 1e3:.1f} ms, peak "
                 f"{p['memory']['peak'] / GIB:.2f} GiB; {_hours(s['hours_at_bound'])} at the "
                 f"bound, {_hours(s['hours_at_mfu'])} at {r['mfu']:.0%} MFU.")
  lines.append(f"Sweep fused: {_hours(r['fused_hours_at_bound'])} on {r['chips']} chips = "
               f"{r['fused_chip_hours_at_bound']:.3g} chip-hours at the bound "
               f"({r['fused_chip_hours_at_mfu']:.3g} at {r['mfu']:.0%} MFU).")
  if 'separate_hours_at_bound' in r:
    lines.append(f"Separately: {_hours(r['separate_hours_at_bound'])} = "
                 f"{r['separate_chip_hours_at_bound']:.3g} chip-hours at the bound "
                 f"({r['separate_chip_hours_at_mfu']:.3g} at {r['mfu']:.0%} MFU); fused / "
                 f"separate chip-hours: {r['chip_hours_at_bound_ratio']:.2f} at the bound, "
                 f"{r['chip_hours_at_mfu_ratio']:.2f} at {r['mfu']:.0%} MFU.")
  return '\n'.join(lines)


def _define_flags():
  return {
      'config': config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                                lock_config=True),
      'sweep': flags.DEFINE_string('sweep', '', 'Plan this experiment\'s sweep, FILE[:ARG], as '
                                   'scripts/sweep.py --fused trains it, instead of one --config; '
                                   '--config.x=y flags then apply to every member.'),
      'topology': flags.DEFINE_string('topology', '', 'TPU topology, e.g. v5e:16x16, v4:2x2x4, '
                                      'v5p:4x4x4.'),
      'json': flags.DEFINE_bool('json', False, 'Print the report as one JSON object.'),
      'breakdown': flags.DEFINE_bool('breakdown', False, f'Also list the top {_TOP} kernels of '
                                     'each program by bytes and by FLOPs, and bytes and FLOPs by '
                                     'part (backbone, FPN, heads, matching, loss, optimizer).'),
      'mfu': flags.DEFINE_float('mfu', 0.4, 'Model FLOPs utilisation for the schedule estimate.'),
      'detector': flags.DEFINE_bool('detector', True, 'Also compile the evaluation detector.'),
      'eval_images': flags.DEFINE_integer('eval_images', 5000, 'Images of one evaluation pass, '
                                          'for its detector time (COCO val2017: 5000).'),
  }


def main(fl, overrides, argv):
  del argv
  config, sweep = fl['config'].value, fl['sweep'].value
  if (config is None) == (not sweep) or not fl['topology'].value:
    raise app.UsageError('--topology and one of --config and --sweep are required.')
  # Compile-only: never take an attached accelerator from a job that may run beside this.
  jax.config.update('jax_platforms', 'cpu')
  breakdown = _TOP if fl['breakdown'].value else 0
  try:
    if sweep:
      report = plan_sweep(sweep, fl['topology'].value, overrides, mfu=fl['mfu'].value,
                          breakdown=breakdown)
    else:
      report = plan(config, fl['topology'].value, mfu=fl['mfu'].value,
                    detector=fl['detector'].value, breakdown=breakdown,
                    eval_images=fl['eval_images'].value)
      check_fits(report)
  except PlanError as e:
    sys.stderr.write(f'pod_plan: {e}\n')
    sys.exit(1)
  if fl['json'].value:
    print(json.dumps(report))
  else:
    print(format_sweep_report(report) if sweep else format_report(report))


def run():
  fl = _define_flags()
  argv, overrides = sys.argv, []
  if any(a == '--sweep' or a.startswith('--sweep=') for a in argv):
    # Every member's overrides, as after scripts/sweep.py's `--`: no --config file to apply to.
    overrides = [a for a in argv[1:] if a.startswith('--config.')]
    argv = [a for a in argv if not a.startswith('--config.')]
  app.run(functools.partial(main, fl, overrides), argv=argv, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
