"""The one base config. Experiment files start from `get_base_config()` and only set fields.

Every field a user may set on the command line has a typed default (an empty string, never
None, for paths), so that `--config.x=y` overrides parse into the right type.

Conventions that every module relies on (one source of truth, do not redefine elsewhere):
- Boxes are (x1, y1, x2, y2) in pixels, float32, unless a docstring says otherwise. Inside the
  model and the input pipeline they are in the resized-and-padded image's pixels; at the
  boundary to COCO files (evaluation, prediction) they become xywh in original-image pixels.
- Anchors for all levels P{min_level}..P{max_level} are concatenated level by level; within a
  level, location-major in row-major (y, x) order, then the A anchors of that location in the
  order `anchors.order` gives. The class head's channel c at a location is anchor c // K,
  class c % K; the box head's channel c is anchor c // 4, coordinate c % 4. That is
  torchvision's layout, so converted weights fit without permutation.
- Labels inside the model are contiguous 0..K-1 (no background class); the data set's own
  category ids are mapped to and from them by `retina_jax.data.categories`.
"""

import importlib.util
import math
import os
import inspect
import types
from typing import Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags

from retina_jax import hyper


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.seed = 0
  config.num_train_steps = 90_000
  config.batch_size = 16  # Global, over every device of every host.
  # Periods in steps; 0 means only at the end of training.
  config.checkpoint_every_steps = 5_000
  config.keep_checkpoints = 3
  # Also keep the checkpoint of the best evaluation by this COCO metric ('AP', 'AP50', ...), as
  # detectron2's BestCheckpointer; evaluate / export --checkpoint=best read it. '': off.
  config.keep_best_by = ''
  config.eval_every_steps = 10_000
  config.log_every_steps = 50
  # Global; 0: the smallest multiple of the data-parallel size and of the hosts that is at least
  # 8 (sizes.default_eval_batch_size), which every pod splits; the last batch is padded.
  config.eval_batch_size = 0
  config.init_from = ''  # Converted ImageNet or RetinaNet parameters (scripts/convert_torchvision.py).
  config.num_demo_pictures = 0  # Pictures of eval predictions written at the end of training.
  # Label <-> category id map as CategoryMap JSON; '' takes the training data's own. Training
  # writes it into the workdir's config.json, so evaluation and export carry it along.
  config.categories = ''

  config.model = ml_collections.ConfigDict()
  config.model.backbone = 'resnet50'  # tiny | resnet18 | resnet34 | resnet50 | resnet101
  config.model.num_classes = 80
  config.model.norm = 'frozen_bn'  # frozen_bn | bn | gn
  config.model.freeze_at = 2  # 0: nothing frozen, 1: stem, 2: stem and res2 (detectron2 meaning).
  config.model.fpn_channels = 256
  config.model.head_channels = 256
  config.model.head_convs = 4
  # none (paper, torchvision v1) | gn: GroupNorm(32) after each head conv (torchvision v2).
  config.model.head_norm = 'none'
  config.model.min_level = 3
  config.model.max_level = 7
  config.model.p6_from = 'c5'  # c5 (paper, detectron2) | p5 (torchvision v1, TF TPU)
  config.model.prior_prob = 0.01
  config.model.dtype = 'bfloat16'  # Compute dtype; parameters are always float32.

  config.anchors = ml_collections.ConfigDict()
  config.anchors.sizes = (32.0, 64.0, 128.0, 256.0, 512.0)  # Base size per level P3..P7.
  config.anchors.scales = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
  config.anchors.aspect_ratios = (0.5, 1.0, 2.0)  # height / width.
  config.anchors.offset = 0.5  # Centre at (i + offset) * stride; torchvision uses 0.
  config.anchors.truncate_sizes = False  # torchvision truncates size * scale to an int...
  config.anchors.round_base = False  # ...and rounds the corners of the anchors centred at 0.
  config.anchors.order = 'ratio_major'  # ratio_major (Detectron, torchvision) | scale_major (detectron2)
  # Stride of level l: 'nominal' 2**l (detectron2, TF) | 'image_over_grid' padded side // grid
  # side (torchvision; differs from 2**l on P6/P7 when a side is not a multiple of 2**l).
  config.anchors.stride_rule = 'nominal'

  config.matcher = ml_collections.ConfigDict()
  config.matcher.foreground_iou = 0.5
  config.matcher.background_iou = 0.4
  config.matcher.allow_low_quality = True
  config.matcher.crowd_ioa = 0.5  # Anchors covered beyond this by a crowd box are ignored.

  config.box_coder = ml_collections.ConfigDict()
  config.box_coder.weights = (1.0, 1.0, 1.0, 1.0)
  config.box_coder.clamp = math.log(1000.0 / 16)

  config.loss = ml_collections.ConfigDict()
  config.loss.kind = 'focal'  # focal | ohem
  config.loss.gamma = 2.0
  config.loss.alpha = 0.25
  config.loss.box_loss = 'smooth_l1'  # smooth_l1 | l1 | giou
  config.loss.smooth_l1_beta = 0.11
  config.loss.box_weight = 1.0
  # 'batch': sums over the batch / its foreground count (paper, detectron2); 'per_image': each
  # image's sums / its own count, averaged over images (torchvision).
  config.loss.normalizer = 'batch'
  config.loss.ohem_batch_per_image = 128
  config.loss.ohem_nms_iou = 0.7
  config.loss.ohem_positive_fraction = 0.0  # 0: hardest anchors regardless of label; 0.25: 1:3.

  config.postprocess = ml_collections.ConfigDict()
  config.postprocess.score_threshold = 0.05
  config.postprocess.pre_nms_topk = 1000  # Per level.
  config.postprocess.nms_iou = 0.5
  config.postprocess.max_detections = 100

  config.data = ml_collections.ConfigDict()
  config.data.name = 'coco/2017'  # shapes | coco_format | a tfds name
  config.data.root = ''  # coco_format: directory with annotations/ and <split>/; shapes: cache dir.
  config.data.tfds_data_dir = ''
  # tfds: where each split's image size index is kept (built once from the image headers, for
  # the training canvases); '' beside the prepared data. Local or gs://.
  config.data.size_index_dir = ''
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.min_size = 800  # Shorter side after resize.
  config.data.max_size = 1333  # Longer side cap.
  # Resize rule (data.resize.RESIZE_RULES): 'pil' (bilinear on uint8, round() sides, uint8 to the
  # device: 1/4 of the bytes) or 'torchvision' (its GeneralizedRCNNTransform exactly: bilinear
  # of the float image, floor() sides, per-axis box ratios; float32 to the device).
  config.data.resize = 'pil'
  # Square bucket every image is padded into: a multiple of 32 (the stride of C5); 128-multiples
  # (1408 holds 1333) tile P7, whose stride is 128, exactly.
  config.data.image_size = 1408
  config.data.max_boxes = 100  # Ground-truth slots per image; extra objects are dropped, counted.
  # Evaluation / prediction canvas: 'orientation' pads landscape and portrait images into the
  # smallest canvases the resize rule fills (800x1344 and 1344x800 for 800 / 1333), 'square'
  # into image_size x image_size as training does, 'torchvision' into the image's own resized
  # sides rounded up to multiples of 32 (one compilation per canvas; data.canvas).
  config.data.eval_buckets = 'orientation'
  # Training canvas: 'square' (image_size x image_size) or 'orientation' (every
  # global batch landscape or portrait, in the canvases above: ~1.8x fewer pixels on COCO;
  # the image sizes come from the annotations, or for tfds from its size index).
  # 'torchvision' also works here (batches grouped by canvas, as in evaluation).
  config.data.train_buckets = 'square'
  config.data.random_flip = True
  # Augmentations beyond the flip, all off here (retina_jax/data/augment.py says what each does).
  config.data.train_min_sizes = ()  # Multi-scale: shorter sides to draw from; () = min_size.
  config.data.train_min_size_sampling = 'choice'  # choice (from the list) | range ((lo, hi))
  config.data.scale_jitter = (1.0, 1.0)  # Factor range on the scale, then crop; (0.1, 2.0): LSJ.
  config.data.crop_min_visible = 0.25  # Share of a box's area a crop must keep for the box to stay.
  config.data.random_vflip = False
  config.data.random_rot90 = False  # Needs square training canvases.
  config.data.brightness = 0.0  # ColorJitter-style: factor from [1 - x, 1 + x].
  config.data.contrast = 0.0
  config.data.saturation = 0.0
  config.data.hue = 0.0  # Shift from [-x, x] turns (<= 0.5).
  config.data.num_workers = 4  # Host threads decoding images.
  config.data.pixel_mean = (0.485 * 255, 0.456 * 255, 0.406 * 255)
  config.data.pixel_std = (0.229 * 255, 0.224 * 255, 0.225 * 255)
  config.data.shapes_num_train = 2000
  config.data.shapes_num_eval = 200
  config.data.max_eval_images = 0  # 0: all.
  config.data.shapes_seed = 0  # Generation seed of the shapes data set (part of its cache key).
  # Unreadable image (missing, corrupt, wrong size): False stops with its path and id; True logs
  # it and trains on without it (an empty row with example_valid False).
  config.data.skip_bad_images = False
  config.data.prefetch_batches = 2  # Host batches built ahead of the training loop.

  config.optim = ml_collections.ConfigDict()
  config.optim.name = 'sgd'  # 'sgd' (the paper's) or 'adamw' (decoupled weight decay).
  config.optim.base_lr = 0.01  # At base_batch_size; scaled linearly with config.batch_size.
  config.optim.base_batch_size = 16
  config.optim.momentum = 0.9  # SGD momentum; AdamW's beta1.
  config.optim.adam_b2 = 0.999
  config.optim.weight_decay = 1e-4
  # Which parameters decay: 'kernels' (conv and dense kernels, not norm scales and biases, as
  # detectron2) or 'all' (torchvision's reference scripts: every trainable parameter).
  config.optim.weight_decay_mask = 'kernels'
  config.optim.warmup_steps = 1000
  config.optim.warmup_factor = 0.001
  config.optim.decay_steps = (60_000, 80_000)
  config.optim.decay_factor = 0.1
  config.optim.grad_clip_norm = 0.0  # 0: off.

  config.mesh = ml_collections.ConfigDict()
  # Size of the 'model' axis; the rest is the 'data' axis. N > 1: spatial partitioning, each
  # image's feature-map rows split over N chips (images too large, or pods too wide, for one
  # image per chip); config.batch_size then counts images over chips / N data shards.
  config.mesh.model_parallelism = 1
  # Fused sweeps (scripts/sweep.py --fused) only: size of the 'sweep' axis that the members are
  # spread over (it must divide their number); each member's batch goes over the 'data' axis of
  # the rest, so sweep x data x model = devices.
  config.mesh.sweep_parallelism = 1

  return config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses an experiment argument 'key=value,key=value' over typed defaults (big_vision style).

  `experiments/retinanet_r50_coco.py:res=600,sched=3x` gives res=600 (an int, because the
  default is one) and sched='3x'. A bare value sets the first key: ':600' is res=600.
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  keys = list(defaults)
  for i, item in enumerate(arg.split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      if i != 0 or not keys:
        raise ValueError(f'Experiment argument {arg!r}: write key=value pairs, e.g. '
                         + ','.join(f'{k}={v}' for k, v in defaults.items()))
      key, value = keys[0], item
    if key not in defaults:
      raise ValueError(f'Experiment argument {arg!r}: unknown key {key!r}; known: {keys}')
    result[key] = _typed(arg, key, value, defaults[key])
  return result


def _typed(arg: str, key: str, value: str, default):
  """value as the type of `default`; bools from true/false/1/0 (bool('False') is True)."""
  kind = type(default)
  if kind is bool:
    if value.lower() in ('true', '1', 'yes'):
      return True
    if value.lower() in ('false', '0', 'no'):
      return False
  else:
    try:
      return kind(value)
    except ValueError:
      pass
  raise ValueError(f'Experiment argument {arg!r}: {key}={value!r} is not a {kind.__name__} '
                   f'(default {default!r}).')


# '1.5x': the paper's Table 2 final models ("1.5x longer than the models in Table 1e"), 1x's
# steps and drops scaled by 1.5.
SCHEDULES = {'1x': (90_000, (60_000, 80_000)), '1.5x': (135_000, (90_000, 120_000)),
             '3x': (270_000, (210_000, 250_000))}


def set_schedule(config: ml_collections.ConfigDict, sched: str, batch_size: int):
  """The detectron2 schedules (iterations at batch 16), rescaled to `batch_size` so that the
  number of epochs stays the same; the LR scales linearly in the optimiser."""
  if sched not in SCHEDULES:
    raise ValueError(f'Unknown schedule {sched!r}; known: {sorted(SCHEDULES)}')
  steps, drops = SCHEDULES[sched]
  factor = 16 / batch_size
  config.batch_size = batch_size
  config.num_train_steps = int(steps * factor)
  config.optim.decay_steps = tuple(int(d * factor) for d in drops)
  config.optim.warmup_steps = int(1000 * min(factor, 1.0)) or 1
  config.checkpoint_every_steps = max(int(5000 * factor), 100)
  config.eval_every_steps = max(int(10_000 * factor), 100)


def set_scale(config: ml_collections.ConfigDict, res: int):
  """Shorter side `res` with the paper's longer-side cap (1333 at 800, same ratio elsewhere),
  padded into the smallest square bucket that is a multiple of 128 (P7's stride; any multiple
  of 32 works, e.g. --config.data.image_size=1344, with P6/P7 grids of ceil(side / stride))."""
  config.data.min_size = res
  config.data.max_size = int(round(res * 1333 / 800))
  config.data.image_size = -(-config.data.max_size // 128) * 128


AUGMENTATIONS = ('flip', 'paper', 'lsj')


def set_augmentation(config: ml_collections.ConfigDict, aug: str, res: int):
  """The training augmentation of a COCO recipe, on top of the horizontal flip:
    'flip': the flip alone (paper Table 1);
    'paper': scale jitter of the shorter side over [0.8 res, res] in steps of 32, the paper's
      Table 2 final models ("trained with scale jitter", 640-800 px at res 800) as detectron2's
      RetinaNet 3x configs sample it (ResizeShortestEdge (640, 672, ..., 800), 'choice');
    'lsj': large-scale jitter, the resize rule's scale times 0.1-2.0 with random crops into the
      canvas (Ghiasi et al. 2021; the TF Model Garden's and torchvision's newer recipes; they
      train longer, e.g. sched=3x).
  """
  if aug not in AUGMENTATIONS:
    raise ValueError(f'Unknown augmentation {aug!r}; known: {AUGMENTATIONS}')
  if aug == 'paper':
    config.data.train_min_sizes = tuple(range(res, int(0.8 * res) - 1, -32))[::-1]
    config.data.train_min_size_sampling = 'choice'
  if aug == 'lsj':
    config.data.scale_jitter = (0.1, 2.0)


def load_experiment(path: str) -> types.ModuleType:
  """The module of an experiment file (its get_config, and get_sweep where defined), by path."""
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep(spec: str) -> list[hyper.Setting]:
  """The settings of the experiment file's `get_sweep(hyper[, arg])` for 'FILE[:ARG]'.

  Raises ValueError when the file defines no get_sweep.
  """
  path, _, arg = spec.partition(':')
  module = load_experiment(path)
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'{path} defines no get_sweep(hyper)')
  get_sweep = module.get_sweep
  takes_arg = len(inspect.signature(get_sweep).parameters) > 1
  return get_sweep(hyper, arg or None) if takes_arg else get_sweep(hyper)


def sweep_configs(spec: str, settings: Sequence[hyper.Setting], overrides: Sequence[str] = ()
                  ) -> list[ml_collections.ConfigDict]:
  """Each setting's config, as its own run `python -m retina_jax.main --config=SPEC <the
  setting's flags> OVERRIDES...` builds it (scripts/sweep.py --fused, tools/pod_plan --sweep)."""
  return [from_flags(spec, [*hyper.to_flags(s), *overrides]) for s in settings]


def from_flags(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config that `python -m retina_jax.main --config=FILE[:ARG] OVERRIDES...` trains with:
  `overrides` are --config.x=y flags, parsed as ml_collections parses them on that line."""
  argv = ['retina_jax', f'--config={spec}', *overrides]
  values = flags.FlagValues()
  # sys_argv: the overrides are read from it when --config is parsed.
  config_flags.DEFINE_config_file('config', None, 'Experiment file.', flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def set_by_path(config: ml_collections.ConfigDict, key: str, value) -> None:
  """config['a']['b'] = value for key 'a.b' (the key of a --config.a.b=value flag); an int for a
  float field becomes a float, as ml_collections' flags do."""
  *parents, leaf = key.split('.')
  node = config
  for name in parents:
    node = node[name]
  if isinstance(node.get(leaf), float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  node[leaf] = value
