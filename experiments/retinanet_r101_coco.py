"""RetinaNet R101-FPN on COCO 2017: the R50 experiment with a deeper backbone.

  python -m retina_jax.main --config experiments/retinanet_r101_coco.py:res=800,sched=3x ...
"""

from retina_jax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, res=800, sched='1x', batch=16)
  config = config_lib.get_base_config()
  config.model.backbone = 'resnet101'
  config_lib.set_schedule(config, arg.sched, arg.batch)
  config_lib.set_scale(config, arg.res)
  config.data.name = 'coco/2017'
  config.data.train_buckets = 'orientation'  # As retinanet_r50_coco.py.
  return config
