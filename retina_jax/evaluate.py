"""COCO evaluation of a checkpoint or of exported parameters.

  python -m retina_jax.evaluate --workdir DIR [--checkpoint latest|best|STEP] [--config ...]
      [--config.x=y ...] [--split S]
  python -m retina_jax.evaluate --params EXPORTED [--workdir DIR] [--config ...]

With --workdir alone the newest checkpoint of DIR is evaluated (--checkpoint=best: the one
config.keep_best_by kept), and DIR/config.json is the config when --config is not given. With
--params the exported directory's parameters (and its config.json, when neither --config nor
DIR/config.json is given) are used. Writes, on the first host, into DIR (or EXPORTED when no
--workdir):
  detections_<split>.json  COCO results: image_id, category_id (the data set's), bbox xywh in
                           original-image pixels, score;
  metrics_<split>.json     the 12 COCO numbers by name and per_class_AP by category name;
  predictions_<split>.png  `config.num_demo_pictures` eval images with their detections (if > 0);
and prints the table.

Every host runs the same command; each evaluates its share of the images, the detections are
gathered to every host and each image counts once (retina_jax.evaluation.evaluator).
"""

import sys

from absl import app
from absl import flags
import jax

from retina_jax import cli
from retina_jax import saved_config
from retina_jax import sizes
from retina_jax.evaluation import coco_eval
from retina_jax.evaluation import evaluator


def _define_flags():
  return {
      'config': cli.define_config_flag('DIR/config.json, else EXPORTED/config.json'),
      'workdir': flags.DEFINE_string('workdir', '', 'Training directory: newest checkpoint, and '
                                     'where the outputs go.'),
      'params': cli.define_params_flag(),
      'split': flags.DEFINE_string('split', '', 'Split to evaluate; default '
                                   'config.data.eval_split.'),
      'checkpoint': cli.define_checkpoint_flag(),
  }


def main(fl, argv):
  del argv
  workdir, params = fl['workdir'].value, fl['params'].value
  if not workdir and not params:
    raise app.UsageError('Give --workdir (newest checkpoint) or --params (exported).')
  config = fl['config'].value
  try:
    config = sizes.with_eval_batch(config, sizes.check_here(config, train=False).eval_batch_size)
  except sizes.SizeError as e:
    sys.exit(f'evaluate: {e}')
  if params:
    variables = saved_config.load_params(params)
    what = params
  else:
    from retina_jax import checkpoint  # pylint: disable=g-import-not-at-top
    variables, step = checkpoint.restore_variables(
        workdir, checkpoint.parse_checkpoint_flag(fl['checkpoint'].value))
    what = f'{workdir} step {step}'
  params_dir = saved_config.export_dir(params)
  out_dir = workdir or params_dir
  split = fl['split'].value or config.data.eval_split
  metrics = evaluator.evaluate_variables(config, variables, out_dir, split=split,
                                         categories_dir=params_dir)
  if jax.process_index() == 0:
    print(f'COCO bbox evaluation of {what} on {config.data.name}:{split}')
    print(coco_eval.format_table(metrics))
    print(f'Wrote {out_dir}/detections_{split}.json and metrics_{split}.json')


if __name__ == '__main__':
  cli.run_with_saved_config(main, _define_flags)
