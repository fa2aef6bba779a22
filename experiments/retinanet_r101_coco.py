"""RetinaNet R101-FPN on COCO 2017: the R50 experiment with a deeper backbone.

  python -m retina_jax.main --config experiments/retinanet_r101_coco.py:res=800,sched=3x ...

Argument keys as retinanet_r50_coco.py (res, sched, batch, aug). The paper's Table 2 R101-FPN
(39.1 AP test-dev: scale jitter, 1.5x longer): `res=800,sched=1.5x,aug=paper`.
"""

from retina_jax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, res=800, sched='1x', batch=16, aug='flip')
  config = config_lib.get_base_config()
  config.model.backbone = 'resnet101'
  config_lib.set_schedule(config, arg.sched, arg.batch)
  config_lib.set_scale(config, arg.res)
  config_lib.set_augmentation(config, arg.aug, arg.res)
  config.data.name = 'coco/2017'
  config.data.train_buckets = 'orientation'  # As retinanet_r50_coco.py.
  return config
