"""Anchor density, paper Table 1c (R50-FPN, 600 px): #scales x #aspect ratios.

  python scripts/sweep.py experiments/anchors_sweep.py --dry-run
"""

from retina_jax import config as config_lib

# Scales are octave fractions 2^(k/n); ratios are height / width.
SETTINGS = (
    ((1.0,), (1.0,)),
    ((1.0, 2 ** 0.5), (1.0,)),
    ((1.0, 2 ** (1 / 3), 2 ** (2 / 3)), (1.0,)),
    ((1.0,), (0.5, 1.0, 2.0)),
    ((1.0, 2 ** 0.5), (0.5, 1.0, 2.0)),
    ((1.0, 2 ** (1 / 3), 2 ** (2 / 3)), (0.5, 1.0, 2.0)),
    ((1.0, 2 ** 0.25, 2 ** 0.5, 2 ** 0.75), (0.5, 1.0, 2.0)),
)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, res=600, data='coco/2017')
  config = config_lib.get_base_config()
  config_lib.set_schedule(config, '1x', 16)
  config_lib.set_scale(config, arg.res)
  config.data.name = arg.data
  return config


def get_sweep(hyper, arg=None):
  del arg
  return hyper.zipit([hyper.sweep('config.anchors.scales', [s for s, _ in SETTINGS]),
                      hyper.sweep('config.anchors.aspect_ratios', [r for _, r in SETTINGS])])
