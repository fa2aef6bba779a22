"""Train on your own COCO-format folder: the experiment for a few hundred annotated images.

  python -m retina_jax.main --workdir workdirs/mine \
      --config experiments/custom_data.py:root=DIR[,size=S,steps=N,batch=B,backbone=tiny|resnet18|resnet50,init=PATH]

DIR holds `annotations/instances_train.json` with `train/` (the images), and a validation split
the same way: `val`, `validation`, `valid` or `test`, the first present (`val=NAME` picks
another; `train=NAME` the training split). The number of classes and their names come from the
training annotations' categories; nothing else needs a flag.

Arguments:
  size      images are resized to fit a size x size square (the shorter side is `size` for
            square images, the longer side for others) and padded into that bucket; a
            multiple of 32 (rounded up otherwise). Anchors scale with it (the paper's at 800).
  steps     training steps (default 3000); evaluation on the validation split every steps / 10,
            and the checkpoint with the best validation AP is kept besides the newest
            (`evaluate` / `export --checkpoint=best`).
  batch     global batch (default 8).
  backbone  tiny (CPU-sized, as the demo), resnet18 (default) or resnet50.
  init      converted ImageNet weights (scripts/convert_torchvision.py) for the backbone:
            frozen batch norm, stem and res2 frozen, SGD as the paper. Without it, from
            scratch: GroupNorm, nothing frozen, AdamW (as the demo; benchmarks/RESULTS.md says why).

Augmentation: the horizontal flip, scale jitter 0.5-1.5 with random crops and a photometric
distortion of brightness, contrast and saturation. On a small data set the flip alone memorises
the training images; scale jitter is the largest gain that suits any imagery (the measurements:
benchmarks/RESULTS.md, "Small data"). Hue is left out: it costs the input pipeline most (an
HSV round trip per image) and colour may be what tells a user's classes apart. Vertical flips
and quarter turns suit overhead imagery only: add
`--config.data.random_vflip=True --config.data.random_rot90=True` there. Augmented training
needs more steps than the flip alone, hence 3000 by default, with the best checkpoint by
validation AP kept so that a long run cannot lose it.
"""

from retina_jax import config as config_lib
from retina_jax import fileio
from retina_jax.data import coco_format

VAL_SPLITS = ('val', 'validation', 'valid', 'test')


def _eval_split(root: str, val: str) -> str:
  if val:
    return val
  annotations = fileio.Path(root) / 'annotations'
  for split in VAL_SPLITS:
    if (annotations / f'instances_{split}.json').exists():
      return split
  found = sorted(p.name for p in annotations.iterdir())
  raise FileNotFoundError(
      f'experiments/custom_data.py: no validation split in {root}/annotations (looked for '
      f'instances_<{"|".join(VAL_SPLITS)}>.json, found {found}); add one or name it with val=NAME.')


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, root='', size=512, steps=3000, batch=8, backbone='resnet18',
                             init='', train='train', val='')
  config = config_lib.get_base_config()
  config.data.name = 'coco_format'
  config.data.root = arg.root
  config.data.train_split = arg.train
  if arg.root:  # Without it the config is complete but training stops asking for the folder.
    if not (fileio.Path(arg.root) / 'annotations').is_dir():
      raise FileNotFoundError(f'experiments/custom_data.py:root={arg.root}: no annotations/ '
                              'folder there (COCO layout: annotations/instances_<split>.json '
                              'and <split>/ with the images).')
    config.data.eval_split = _eval_split(arg.root, arg.val)
    config.model.num_classes = coco_format.read_categories(arg.root, arg.train).num_classes

  size = -(-arg.size // 32) * 32
  config.data.min_size = config.data.max_size = config.data.image_size = size
  config.anchors.sizes = tuple(s * size / 800 for s in config.anchors.sizes)
  config.data.random_flip = True
  config.data.scale_jitter = (0.5, 1.5)
  config.data.brightness = config.data.contrast = config.data.saturation = 0.3

  config.model.backbone = arg.backbone
  if arg.backbone == 'tiny':  # The demo's model: small enough to train on a laptop CPU.
    config.model.fpn_channels = config.model.head_channels = 64
    config.model.head_convs = 2
    config.model.dtype = 'float32'

  config.batch_size = arg.batch
  config.num_train_steps = arg.steps
  config.eval_every_steps = config.checkpoint_every_steps = max(arg.steps // 10, 1)
  config.keep_best_by = 'AP'
  config.log_every_steps = min(50, config.eval_every_steps)
  config.eval_batch_size = arg.batch
  config.num_demo_pictures = 4
  config.optim.base_batch_size = 16
  config.optim.warmup_steps = min(500, max(arg.steps // 20, 1))
  config.optim.decay_steps = (int(arg.steps * 0.75), int(arg.steps * 0.9))
  config.optim.grad_clip_norm = 10.0
  if arg.init:  # The paper's fine-tuning recipe from ImageNet weights.
    config.init_from = arg.init
    config.model.norm, config.model.freeze_at = 'frozen_bn', 2
    config.optim.name, config.optim.base_lr = 'sgd', 0.01
  else:  # From scratch, as the demo: GroupNorm and AdamW (see experiments/smoke/shapes_demo.py).
    config.model.norm, config.model.freeze_at = 'gn', 0
    config.optim.name, config.optim.base_lr = 'adamw', 0.002
    config.optim.weight_decay = 0.05
  return config
