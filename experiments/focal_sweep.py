"""The focal-loss ablations of the paper, R50-FPN at 600 px (Tables 1a and 1b).

  python scripts/sweep.py experiments/focal_sweep.py --dry-run      # list the runs
  python scripts/sweep.py experiments/focal_sweep.py:table=1b --workdir_root DIR

Argument keys: table (1a: cross entropy, gamma 0, by alpha; 1b: gamma with its best alpha;
all: both), res. The same gamma sweep on the synthetic data: experiments/smoke/shapes_demo.py.
"""

from retina_jax import config as config_lib

TABLE_1A_ALPHAS = (0.10, 0.25, 0.50, 0.75, 0.90, 0.99, 0.999)
TABLE_1B = ((0.0, 0.75), (0.1, 0.75), (0.2, 0.75), (0.5, 0.50), (1.0, 0.25), (2.0, 0.25),
            (5.0, 0.25))


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, table='all', res=600)
  config = config_lib.get_base_config()
  config_lib.set_schedule(config, '1x', 16)
  config_lib.set_scale(config, arg.res)
  config.data.name = 'coco/2017'
  return config


def get_sweep(hyper, arg=None):
  arg = config_lib.parse_arg(arg, table='all', res=600)
  table_1a = hyper.product([hyper.fixed('config.loss.gamma', 0.0),
                            hyper.sweep('config.loss.alpha', TABLE_1A_ALPHAS)])
  table_1b = hyper.zipit([hyper.sweep('config.loss.gamma', [g for g, _ in TABLE_1B]),
                          hyper.sweep('config.loss.alpha', [a for _, a in TABLE_1B])])
  return {'1a': table_1a, '1b': table_1b, 'all': hyper.chainit([table_1a, table_1b])}[arg.table]
