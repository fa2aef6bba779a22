"""Evaluating a set of variables: the detector over an eval split, COCO metrics, output files.

Used by the `retina_jax.evaluate` entry point and by the periodic evaluation of training. Every
host runs the same call; each evaluates its share of the images, the detections are gathered to
every host and each image counts once (`coco_eval.gather_and_dedupe`); each host then matches
its share of the categories and the shares are gathered (`coco_eval.match_share`).

Three parts, so that training can score in a thread while the devices train on:
`detect_split` (the devices, collectives), `score` (host only, no collective: safe in a
thread), `finish` (gathers the hosts' shares: every host at the same point).
"""

import collections
import dataclasses
import json

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from retina_jax import fileio
from retina_jax import inference
from retina_jax import models
from retina_jax import saved_config
from retina_jax import sharding as sharding_lib
from retina_jax import sizes
from retina_jax import visualize
from retina_jax.data import pipeline
from retina_jax.evaluation import coco_eval


class _Detectors:
  """The jitted detectors of the `size` (config, mesh) pairs used last, so that the periodic
  evaluation of a run (or of a fused sweep's members, one config each) compiles once; older
  ones, e.g. of runs that finished earlier in the same process, are dropped with their
  executables instead of piling up."""

  def __init__(self, size: int):
    self._size = size
    self._jitted = collections.OrderedDict()

  def get(self, config, mesh):
    key = (config.to_json_best_effort(), mesh)
    if key in self._jitted:
      self._jitted.move_to_end(key)
    else:
      batch = sharding_lib.batch_sharding(mesh)
      self._jitted[key] = jax.jit(
          inference.make_detect_fn(config, models.create_model(config, mesh)),
          in_shardings=(sharding_lib.replicated(mesh), batch, batch), out_shardings=batch)
      while len(self._jitted) > self._size:
        self._jitted.popitem(last=False)
    return self._jitted[key]

  def __len__(self):
    return len(self._jitted)


DETECTORS = _Detectors(size=8)  # A fused sweep's group evaluates up to that many configs in turn.


def sharded_detect(config, mesh):
  return DETECTORS.get(config, mesh)


def run_detector(config, variables, source, categories, mesh, num_pictures: int = 0,
                 image_hw=None):
  """Detections of this host's share of the eval images.

  image_hw: original (h, w) of the eval images, which picks each one's canvas
  (`canvas.eval_canvas`); every batch is S x S without it.

  Returns:
    (arrays, pictures): arrays as `coco_eval.DetectionAccumulator.arrays` with boxes in
    original-image pixels; up to `num_pictures` PIL images of the first eval images with their
    detections drawn (resized image, as the model saw it).
  """
  sizes.check_batch('config.eval_batch_size', config.eval_batch_size,
                    mesh.shape[sharding_lib.DATA_AXIS], jax.process_count())
  local_batch = config.eval_batch_size // jax.process_count()
  detect = sharded_detect(config, mesh)
  variables = jax.device_put(variables, sharding_lib.replicated(mesh))
  spec = sharding_lib.batch_sharding(mesh).spec
  acc = coco_eval.DetectionAccumulator()
  pictures = []

  def collect(dets, host_batch):
    dets = multihost_utils.global_array_to_host_local_array(dets, mesh, spec)
    dets = jax.tree.map(np.asarray, dets)
    for i in np.flatnonzero(host_batch['example_valid'])[:num_pictures - len(pictures)]:
      h, w = host_batch['image_hw'][i]
      pictures.append(visualize.draw_detections(
          host_batch['image'][i, :h, :w], dets['boxes'][i], dets['scores'][i],
          dets['labels'][i], categories.names, score_threshold=0.3, valid=dets['valid'][i],
          min_side=256))
    orig = inference.to_original_coords(dets, host_batch['scale'], host_batch['orig_hw'])
    acc.add(host_batch['image_id'], host_batch['example_valid'], orig['boxes'], orig['scores'],
            orig['labels'], orig['valid'])

  # One batch in flight: the device runs batch b while the host collects batch b - 1.
  in_flight = None
  for host_batch in pipeline.eval_batches(source, config.data, config.eval_batch_size,
                                          num_images=config.data.max_eval_images,
                                          image_hw=image_hw):
    if host_batch['image'].shape[0] != local_batch:
      raise ValueError(f'Eval batch of {host_batch["image"].shape[0]} images on this host; '
                       f'expected {local_batch} (config.eval_batch_size / hosts).')
    inputs = sharding_lib.to_global(
        {'image': host_batch['image'], 'image_hw': host_batch['image_hw']}, mesh)
    dets = detect(variables, inputs['image'], inputs['image_hw'])
    if in_flight is not None:
      collect(*in_flight)
    in_flight = (dets, host_batch)
  if in_flight is not None:
    collect(*in_flight)
  return acc.arrays(), pictures


@dataclasses.dataclass
class Detections:
  """The detector's output over one eval split, gathered: every host holds the same."""
  split: str
  gt: dict  # COCO instances dict of the evaluated images.
  dets: dict[str, np.ndarray]  # As `coco_eval.gather_and_dedupe` returns them.
  category_ids: list[int]  # Entry l: the data set's category id of contiguous label l.
  pictures: list = dataclasses.field(default_factory=list)


def detect_split(config, variables, workdir: str = '', mesh=None, split: str = '',
                 categories_dir: str = '') -> Detections:
  """Runs the detector over `split` on every host (arguments as `evaluate_variables`')."""
  split = split or config.data.eval_split
  mesh = mesh if mesh is not None else sharding_lib.make_mesh(config)
  source = pipeline.create_source(config.data, split)
  categories = saved_config.resolve_categories(config, categories_dir, workdir, source=source)
  if categories.num_classes != config.model.num_classes:
    raise ValueError(f'The category map has {categories.num_classes} categories but '
                     f'config.model.num_classes={config.model.num_classes}.')
  num_pictures = int(config.get('num_demo_pictures', 0))
  gt = source.coco_gt(config.data.max_eval_images)
  image_hw = [(im['height'], im['width']) for im in gt['images']]
  local, pictures = run_detector(config, variables, source, categories, mesh, num_pictures,
                                 image_hw=image_hw)
  return Detections(split, gt, coco_eval.gather_and_dedupe(local), list(categories.ids),
                    pictures)


def score(d: Detections, workdir: str) -> coco_eval.HostShare:
  """This host's share of the COCO metric of `d`; writes detections_<split>.json and the
  pictures (first host). No collective: it may run in a thread while training goes on."""
  results = coco_eval.to_coco_results(d.dets, d.category_ids)
  skipped = len(d.gt['images']) - len(d.dets['image_id'])
  if skipped:  # Unreadable images under config.data.skip_bad_images.
    logging.warning('%d of the %d images of %r were skipped as unreadable and are left out of '
                    'the metrics.', skipped, len(d.gt['images']), d.split)
  if jax.process_index() == 0 and workdir:
    out = fileio.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    fileio.write_atomic(out / f'detections_{d.split}.json', json.dumps(results))
    if d.pictures:
      visualize.save(visualize.grid(d.pictures), out / f'predictions_{d.split}.png')
  return coco_eval.match_share(d.gt, results, image_ids=d.dets['image_id'], share_hosts=True)


def finish(d: Detections, share: coco_eval.HostShare, workdir: str) -> dict:
  """The metrics from every host's share (a collective); writes metrics_<split>.json."""
  metrics = coco_eval.merge_shares(share)
  logging.info('Evaluated %d images of %r: AP %.4f', len(d.dets['image_id']), d.split,
               metrics['AP'])
  if jax.process_index() == 0 and workdir:
    fileio.write_atomic(fileio.Path(workdir) / f'metrics_{d.split}.json',
                        json.dumps(metrics, indent=2))
  return metrics


def evaluate_variables(config, variables, workdir: str, mesh=None, split: str = '',
                       categories_dir: str = '') -> dict:
  """Evaluates `variables` on `split` (config.data.eval_split by default); writes into workdir.

  Args:
    config: the full config.
    variables: {'params', 'batch_stats'}, numpy or replicated jax arrays.
    workdir: where detections_<split>.json etc. go ('' writes nothing).
    mesh: the device mesh; `sharding.make_mesh(config)` when None.
    split: the split to evaluate.
    categories_dir: a directory whose categories.json maps labels to category ids when the
      config carries no map (`saved_config.resolve_categories`).
  Returns:
    The metrics of `coco_eval.evaluate_detections` (12 floats and 'per_class_AP').
  """
  d = detect_split(config, variables, workdir, mesh, split, categories_dir)
  return finish(d, score(d, workdir), workdir)
