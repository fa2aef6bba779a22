"""The real train step and loop on a tiny model: two steps that compile once, a sweep value that
changes the loss and lands in the resolved config, and the NaN guard. Shared helpers for the
process-level tests (test_resume.py, test_train_distributed.py)."""

import json
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest

from retina_jax import checkpoint as ckpt
from retina_jax import config as config_lib
from retina_jax import metrics as metrics_lib
from retina_jax import models
from retina_jax import run_control
from retina_jax import sharding as sharding_lib
from retina_jax import train
from retina_jax.data import pipeline
from tests import tiny_detector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, 'experiments', 'smoke', 'shapes_demo.py')

# Overrides that make the demo experiment tiny; used in-process and on command lines alike.
TINY = {
    'batch_size': 4, 'num_train_steps': 6, 'log_every_steps': 1, 'checkpoint_every_steps': 2,
    'eval_every_steps': 0, 'eval_batch_size': 4, 'num_demo_pictures': 0,
    'model.fpn_channels': 16, 'model.head_channels': 16, 'model.head_convs': 1,
    'data.shapes_num_train': 24, 'data.shapes_num_eval': 4, 'data.num_workers': 1,
    'data.max_eval_images': 4, 'optim.warmup_steps': 2, 'optim.decay_steps': (4,),
}


@pytest.fixture(scope='module')
def shapes_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('shapes'))


def tiny_config(shapes_root, **overrides):
  config = config_lib.load_experiment(DEMO).get_config()
  for key, value in {**TINY, 'data.root': shapes_root, **overrides}.items():
    config_lib.set_by_path(config, key, value)
  return config


def command_line(config_overrides: dict, workdir: str) -> list[str]:
  flags = []
  for key, value in config_overrides.items():
    if isinstance(value, tuple):
      value = '(' + ','.join(str(v) for v in value) + (',)' if len(value) == 1 else ')')
    flags.append(f'--config.{key}={value}')
  return [sys.executable, '-m', 'retina_jax.main', f'--config={DEMO}', f'--workdir={workdir}',
          *flags]


def env_with_devices(n: int) -> dict[str, str]:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={n}'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  return env


def read_metrics(workdir: str) -> list[dict]:
  """The training records of the workdir's metrics (evaluation records are left out)."""
  return [r for r in metrics_lib.read_records(workdir) if 'train/loss' in r]


def finished_checkpoints(workdir: str) -> list[int]:
  """Steps whose checkpoint is complete (orbax renames a step's folder to its number last)."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


# 160 is a multiple of 32 but not of 128: P6 and P7 have ceil-sized grids (3 x 3, 2 x 2).
@pytest.mark.parametrize('size', [128, 160])
def test_two_real_steps_train_and_compile_once(shapes_root, size):
  config = tiny_config(shapes_root, **{'data.image_size': size, 'data.min_size': size,
                                       'data.max_size': size})
  mesh = sharding_lib.make_mesh(config)
  model = models.create_model(config)
  state, tx = train.create_train_state(config, model, mesh)
  step_fn = train.make_train_step(config, model, tx, mesh)
  source = pipeline.create_source(config.data, config.data.train_split)
  loader = pipeline.TrainLoader(source, config.data, config.batch_size, config.seed)
  before = jax.device_get(state.params)
  losses = []
  for step in range(2):
    state, metrics = step_fn(state, sharding_lib.to_global(loader.batch(step), mesh))
    losses.append(float(metrics['loss']))
    assert metrics['num_foreground'] > 0
  assert all(np.isfinite(losses))
  assert int(state.step) == 2 and int(state.first_bad_step) == -1
  after = jax.device_get(state.params)
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after))
  assert any(changed)
  assert step_fn._cache_size() == 1, 'the step recompiled'
  assert len(state.params['backbone' if 'backbone' in state.params else
                          next(iter(state.params))]) > 0


def test_sweep_value_changes_the_loss_and_lands_in_the_resolved_config(shapes_root, tmp_path):
  first_losses = {}
  for gamma in (0.0, 2.0):
    workdir = str(tmp_path / f'gamma{gamma}')
    config = tiny_config(shapes_root, num_train_steps=1, **{'loss.gamma': gamma})
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, 'config.json')) as f:
      assert json.load(f)['loss']['gamma'] == gamma
    first_losses[gamma] = read_metrics(workdir)[0]['train/loss']
  assert first_losses[0.0] != pytest.approx(first_losses[2.0], rel=1e-3)


def test_non_finite_loss_stops_with_the_step_and_last_good_checkpoint(shapes_root, tmp_path):
  config = tiny_config(shapes_root, **{'optim.base_lr': 1e30, 'optim.warmup_steps': 0})
  with pytest.raises(run_control.NonFiniteError, match=r'step \d+.*last good checkpoint'):
    train.train_and_evaluate(config, str(tmp_path))
  steps = ckpt.make_manager(str(tmp_path), 3).all_steps()
  for step in steps:
    variables, _ = ckpt.restore_variables(str(tmp_path), step)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))


def test_resume_needs_the_checkpoint_not_the_init_from_file(shapes_root, tmp_path):
  from retina_jax import convert  # pylint: disable=g-import-not-at-top
  pretrained = str(tmp_path / 'pretrained.msgpack')
  config = tiny_config(shapes_root, num_train_steps=1, init_from=pretrained)
  variables = train.init_variables(config, models.create_model(config),
                                   jax.random.key(1, impl='rbg'), pretrained=False)
  convert.save_variables(variables, pretrained)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  os.remove(pretrained)  # Cleaned up, or a relative path run from another directory.
  config = tiny_config(shapes_root, num_train_steps=2, init_from=pretrained)
  train.train_and_evaluate(config, workdir)
  assert [m['step'] for m in read_metrics(workdir)] == [1, 2]
  with pytest.raises(FileNotFoundError, match='init_from'):  # A fresh run still needs it.
    train.train_and_evaluate(config, str(tmp_path / 'fresh'))


def test_resume_under_another_model_config_names_the_variable_and_keeps_config_json(
    shapes_root, tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(shapes_root, num_train_steps=1), workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = f.read()
  with pytest.raises(ValueError, match=r'params/\S+: \(.*\) saved, \(.*\) now.*new --workdir'):
    train.train_and_evaluate(
        tiny_config(shapes_root, num_train_steps=2, **{'model.fpn_channels': 8}), workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert f.read() == saved  # Evaluation and export still rebuild the model that was trained.


def test_lowering_num_train_steps_evaluates_the_checkpoint_under_its_own_step(shapes_root,
                                                                              tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(shapes_root, num_train_steps=2), workdir)
  train.train_and_evaluate(tiny_config(shapes_root, num_train_steps=1), workdir)
  evals = [r['step'] for r in metrics_lib.read_records(workdir) if 'eval/AP' in r]
  assert evals == [2, 2]  # Not 1: the parameters evaluated are those of step 2.


def test_custom_data_trains_on_a_folder_with_its_classes_and_keeps_the_best(tmp_path):
  """experiments/custom_data.py on a generated COCO folder: classes from its annotations, and
  config.keep_best_by keeps the checkpoint of the best validation evaluation."""
  root = str(tmp_path / 'mine')
  tiny_detector.write_coco_dir(root, split='train')
  tiny_detector.write_coco_dir(root, split='val')
  config = config_lib.load_experiment(os.path.join(ROOT, 'experiments', 'custom_data.py')
                                      ).get_config(f'root={root},size=96,steps=2,batch=4,'
                                                   'backbone=tiny')
  assert config.model.num_classes == tiny_detector.CATEGORIES.num_classes
  config.model.fpn_channels = config.model.head_channels = 16
  config.model.head_convs, config.data.num_workers, config.num_demo_pictures = 1, 1, 0
  workdir = str(tmp_path / 'run')
  with pytest.raises(ValueError, match='keep_best_by'):
    train.train_and_evaluate(ml_collections.ConfigDict({**config.to_dict(), 'keep_best_by': 'mAP'}),
                             workdir)
  train.train_and_evaluate(config, workdir)
  evals = {r['step']: r['eval/AP'] for r in metrics_lib.read_records(workdir) if 'eval/AP' in r}
  assert sorted(evals) == [1, 2]
  _, step = ckpt.restore_variables(workdir, ckpt.BEST)
  assert step == min(s for s, v in evals.items() if v == max(evals.values()))  # Ties: earlier.


def test_period_zero_means_only_at_the_end(shapes_root, tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(shapes_root, num_train_steps=3, log_every_steps=0,
                                       checkpoint_every_steps=0), workdir)
  assert [m['step'] for m in read_metrics(workdir)] == [3]
  assert finished_checkpoints(workdir) == [3]


def test_resumed_logger_drops_what_the_killed_run_logged_after_the_checkpoint(tmp_path):
  lines = [json.dumps({'step': s, 'train/loss': 1.0 / s}) for s in range(1, 7)]
  lines.insert(3, json.dumps({'step': 3, 'eval/AP': 0.1}))
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(lines) + '\n{"step": 7, "train/lo')  # Cut.
  logger = metrics_lib.MetricLogger(str(tmp_path), resume_step=4)
  logger.write(5, {'loss': 0.5})
  logger.close()
  records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [1, 2, 3, 3, 4, 5]
  assert records[-1] == {'step': 5, 'train/loss': 0.5}
  # A fresh run (step 0) appends to whatever is there.
  metrics_lib.MetricLogger(str(tmp_path), resume_step=0).close()
  assert len((tmp_path / 'metrics.jsonl').read_text().splitlines()) == 6


def test_metric_is_computed_while_training_goes_on_and_survives_a_preemption(
    shapes_root, tmp_path, monkeypatch):
  """Each COCO metric is made slow (it waits until training has logged the next step): step 1's
  is logged after step 2's training record, at step 1. Step 2's is still running when a
  preemption stops the run at step 3: the resumed run scores it again and logs it once, at
  step 2. Leaves out several hosts (the collective poll) and a redo with keep_best_by."""
  import threading  # pylint: disable=g-import-not-at-top
  from retina_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  writes, cond, state = [], threading.Condition(), {'released': False}
  real_write, real_score = metrics_lib.MetricLogger.write, evaluator.score

  def write(self, step, metrics, prefix='train'):
    real_write(self, step, metrics, prefix)
    with cond:
      writes.append((prefix, step))
      cond.notify_all()

  def slow_score(d, workdir):
    with cond:
      now = max(s for p, s in writes if p == 'train')
      cond.wait_for(lambda: state['released'] or ('train', now + 1) in writes, timeout=120)
      if state['released']:
        raise RuntimeError('the process was stopped')
    return real_score(d, workdir)

  monkeypatch.setattr(metrics_lib.MetricLogger, 'write', write)
  monkeypatch.setattr(evaluator, 'score', slow_score)
  monkeypatch.setattr(run_control.Preemption, 'reached', lambda self, step: step == 3)
  workdir = str(tmp_path)
  config = tiny_config(shapes_root, num_train_steps=4, eval_every_steps=1,
                       **{'data.eval_buckets': 'square'})  # One detector compilation.
  with pytest.raises(run_control.Preempted):
    train.train_and_evaluate(config, workdir)
  assert writes.index(('eval', 1)) > writes.index(('train', 2))  # Trained on meanwhile.
  assert ('eval', 2) not in writes
  assert os.path.exists(os.path.join(workdir, 'pending_eval', '2.npz'))
  with cond:
    state['released'] = True
    cond.notify_all()
  monkeypatch.setattr(evaluator, 'score', real_score)
  # What a resumed run does before it trains on (the training itself is left out: it is the
  # tested resume): the kept detections of step 2 are scored and logged at step 2, once.
  logger = metrics_lib.MetricLogger(workdir, resume_step=3)
  background = train.background_metrics(train.with_categories(
      config, pipeline.create_source(config.data, config.data.train_split).categories),
      workdir, logger, None, resume_step=3)
  assert background.pending_step == 2
  background.wait()
  logger.close()
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    evals = [r['step'] for r in map(json.loads, f) if 'eval/AP' in r]
  assert evals == [1, 2]
  assert not os.listdir(os.path.join(workdir, 'pending_eval'))
  assert train.background_metrics(config, workdir, logger, None, 3).pending_step is None


def test_resumed_run_redoes_only_unlogged_metrics_at_or_before_its_step(tmp_path):
  from retina_jax.evaluation import background as background_lib  # pylint: disable=g-import-not-at-top
  from retina_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  gt = {'images': [{'id': 5, 'width': 50, 'height': 40}],
        'annotations': [{'id': 1, 'image_id': 5, 'category_id': 3, 'bbox': [1, 2, 20, 10],
                         'area': 200, 'iscrowd': 0}],
        'categories': [{'id': 3, 'name': 'c'}]}
  dets = {'image_id': np.array([5]), 'example_valid': np.array([True]),
          'boxes': np.array([[[1, 2, 21, 12]]], np.float32), 'scores': np.array([[0.9]]),
          'labels': np.array([[0]]), 'valid': np.array([[True]])}
  for step in (2, 3, 9):
    background_lib._write_pending(str(tmp_path), step,  # pylint: disable=protected-access
                                  evaluator.Detections('val', gt, dets, [3]))
  logged = []
  bg = background_lib.BackgroundMetrics(str(tmp_path), lambda *a: logged.append(a),
                                        lambda step, e: e)
  bg.redo(5, {2}, lambda split: gt, lambda step: f'variables of {step}')
  bg.wait()
  assert [(s, m['AP'], v) for s, m, v in logged] == [(3, 1.0, 'variables of 3')]
  assert not os.listdir(tmp_path / 'pending_eval')
