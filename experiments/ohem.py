"""The OHEM baseline of paper Table 1d (R101-FPN): cross entropy on the hardest anchors after
NMS over the anchor boxes, instead of focal loss over all anchors.

  python -m retina_jax.main --config experiments/ohem.py:batch=128,nms=0.5 --workdir DIR
  python scripts/sweep.py experiments/ohem.py --dry-run
"""

from retina_jax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, batch=128, nms=0.5, ratio=0.0, res=600,
                             backbone='resnet101')
  config = config_lib.get_base_config()
  config.model.backbone = arg.backbone
  config_lib.set_schedule(config, '1x', 16)
  config_lib.set_scale(config, arg.res)
  config.data.name = 'coco/2017'
  config.loss.kind = 'ohem'
  config.loss.ohem_batch_per_image = arg.batch
  config.loss.ohem_nms_iou = arg.nms
  config.loss.ohem_positive_fraction = arg.ratio
  return config


def get_sweep(hyper, arg=None):
  del arg
  return hyper.product([hyper.sweep('config.loss.ohem_batch_per_image', [128, 256]),
                        hyper.sweep('config.loss.ohem_nms_iou', [0.5, 0.7]),
                        hyper.sweep('config.loss.ohem_positive_fraction', [0.0, 0.25])])
