"""Every torchvision convention, so that weights converted from `retinanet_resnet50_fpn` (v1)
predict what torchvision predicts, on any image size, and train as its reference scripts train:
`python scripts/convert_torchvision.py IN.pth OUT` then
`--config experiments/torchvision_compat.py --config.init_from=OUT` (tests/test_torchvision_exact.py
checks predict, evaluate and a training step against torchvision's own model).

Labels are torchvision's 91-id COCO indices (its cls_logits has 91 rows, 0 = background unused).

Argument: version=v1 (default, `retinanet_resnet50_fpn`) | v2 (`retinanet_resnet50_fpn_v2`: P6
from C5, GroupNorm heads, GIoU box loss). Models trained under either export back to torchvision
(`python -m retina_jax.export --format torchvision`).
"""

from retina_jax import config as config_lib
from retina_jax.data import categories


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, version='v1')
  if arg.version not in ('v1', 'v2'):
    raise ValueError(f'torchvision_compat.py:version={arg.version}: expected v1 or v2.')
  config = config_lib.get_base_config()

  config.anchors.offset = 0.0  # Anchor centres at i * stride.
  config.anchors.truncate_sizes = True  # int(size * scale)...
  config.anchors.round_base = True  # ...and rounded corners of the zero-centred base anchors.
  config.anchors.order = 'ratio_major'
  config.anchors.stride_rule = 'image_over_grid'  # Padded side // grid side on each level.

  config.model.backbone = 'resnet50'
  config.model.p6_from = 'p5'  # LastLevelP6P7(256, 256).
  config.model.norm = 'frozen_bn'
  config.model.dtype = 'float32'
  config.model.num_classes = 91
  config.categories = categories.torchvision_coco_v1().to_json()  # category_id = label.

  config.postprocess.max_detections = 300
  config.loss.box_loss = 'l1'  # torchvision v1 regresses boxes with plain L1.
  config.loss.normalizer = 'per_image'  # Each image's losses / its foreground count, averaged.
  config.optim.weight_decay_mask = 'all'  # Its reference scripts decay biases too.
  if arg.version == 'v2':
    config.model.p6_from = 'c5'  # LastLevelP6P7(2048, 256).
    config.model.head_norm = 'gn'  # RetinaNetHead(norm_layer=partial(nn.GroupNorm, 32)).
    config.loss.box_loss = 'giou'
  config.data.min_size = 800
  config.data.max_size = 1333
  config.data.resize = 'torchvision'  # GeneralizedRCNNTransform: float bilinear, floor sides.
  config.data.eval_buckets = 'torchvision'  # Each image padded to multiples of 32 of its size.
  return config
