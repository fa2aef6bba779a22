"""RetinaNet R50-FPN on COCO 2017 (paper Table 1e / detectron2 schedules).

  python -m retina_jax.main --config experiments/retinanet_r50_coco.py:res=800,sched=1x \
      --workdir gs://bucket/r50_800_1x

Argument keys: res (shorter side: 400, 500, 600, 700, 800 for the scale rows of Table 1e),
sched (1x | 1.5x | 3x), batch (global batch; steps and LR rescale), backbone, aug (flip: the
flip alone, as Table 1; paper: the shorter side jittered over 640-800 px as Table 2's final
models, sampled as detectron2's 3x configs do; lsj: large-scale jitter 0.1-2.0 with crops; see
`config.set_augmentation`). Table 2's recipe (shown there for R101, 39.1 AP):
`res=800,sched=1.5x,aug=paper`.
Starts from converted ImageNet weights when `--config.init_from` names a file written by
`scripts/convert_torchvision.py` (frozen BN, stem and res2 frozen, as in the paper).
"""

from retina_jax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, res=800, sched='1x', batch=16, backbone='resnet50', aug='flip')
  config = config_lib.get_base_config()
  config.model.backbone = arg.backbone
  config_lib.set_schedule(config, arg.sched, arg.batch)
  config_lib.set_scale(config, arg.res)
  config_lib.set_augmentation(config, arg.aug, arg.res)
  config.data.name = 'coco/2017'
  # Landscape / portrait batches (as detectron2's aspect-ratio grouping), on tfds as on
  # coco_format: tfds's image sizes come from its size index (config.data.size_index_dir).
  config.data.train_buckets = 'orientation'
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  return config
