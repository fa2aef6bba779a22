"""Experiment files are data: they load, their sweeps expand, and the sweep script wires them."""

import glob
import json
import os
import subprocess
import sys

import pytest

from retina_jax import config as config_lib
from retina_jax import hyper
from tests import tiny_detector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_load = config_lib.load_experiment


EXPERIMENTS = sorted(p for p in glob.glob(os.path.join(ROOT, 'experiments', '**', '*.py'),
                                         recursive=True)
                     if os.path.basename(p) != '__init__.py')


@pytest.mark.parametrize('path', EXPERIMENTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_experiment_file_builds_a_complete_config(path):
  config = _load(path).get_config()
  base = config_lib.get_base_config()
  # Experiments only set fields: the set of fields is the base config's.
  def keys(c, prefix=''):
    out = set()
    for k, v in c.items():
      out |= keys(v, prefix + k + '.') if hasattr(v, 'items') else {prefix + k}
    return out
  assert keys(config) == keys(base)
  assert config.data.image_size % 32 == 0


def test_parse_arg_types_and_errors():
  arg = config_lib.parse_arg('res=600,sched=3x', res=800, sched='1x')
  assert arg.res == 600 and arg.sched == '3x'
  assert config_lib.parse_arg('600', res=800, sched='1x').res == 600
  with pytest.raises(ValueError, match='unknown key'):
    config_lib.parse_arg('resolution=600', res=800)
  # Booleans from their spelling (bool('false') is True), and a bad value names its key.
  assert config_lib.parse_arg('flip=false', res=800, flip=True).flip is False
  assert config_lib.parse_arg('flip=1', res=800, flip=False).flip is True
  with pytest.raises(ValueError, match=r"res='abc' is not a int"):
    config_lib.parse_arg('res=abc', res=800)
  with pytest.raises(ValueError, match=r"flip='maybe' is not a bool"):
    config_lib.parse_arg('flip=maybe', flip=True)


def test_r50_scale_and_schedule_arguments():
  module = _load(os.path.join(ROOT, 'experiments', 'retinanet_r50_coco.py'))
  c = module.get_config('res=600,sched=1x,batch=64')
  assert (c.data.min_size, c.data.max_size, c.data.image_size) == (600, 1000, 1024)
  assert c.num_train_steps == 90_000 // 4 and c.optim.decay_steps == (15_000, 20_000)
  c = module.get_config(None)
  assert (c.data.min_size, c.data.max_size, c.data.image_size) == (800, 1333, 1408)


def test_hyper_product_zip_chain():
  s = hyper.product([hyper.sweep('config.a', [1, 2]), hyper.sweep('config.b', ['x', 'y'])])
  assert s == [{'config.a': 1, 'config.b': 'x'}, {'config.a': 1, 'config.b': 'y'},
               {'config.a': 2, 'config.b': 'x'}, {'config.a': 2, 'config.b': 'y'}]
  z = hyper.zipit([hyper.sweep('config.a', [1, 2]), hyper.sweep('config.b', [3, 4])])
  assert z == [{'config.a': 1, 'config.b': 3}, {'config.a': 2, 'config.b': 4}]
  assert len(hyper.chainit([s, z])) == 6
  with pytest.raises(ValueError):
    hyper.zipit([hyper.sweep('config.a', [1]), hyper.sweep('config.b', [3, 4])])
  assert hyper.to_flags({'config.anchors.scales': (1.0,)}) == ['--config.anchors.scales=(1.0,)']


def test_focal_sweep_reproduces_paper_tables():
  module = _load(os.path.join(ROOT, 'experiments', 'focal_sweep.py'))
  table_1b = module.get_sweep(hyper, 'table=1b')
  assert [(s['config.loss.gamma'], s['config.loss.alpha']) for s in table_1b] == \
      list(module.TABLE_1B)
  table_1a = module.get_sweep(hyper, 'table=1a')
  assert all(s['config.loss.gamma'] == 0.0 for s in table_1a) and len(table_1a) == 7


def test_sweep_script_dry_run_lists_one_workdir_per_setting(tmp_path):
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'scripts', 'sweep.py'),
       os.path.join(ROOT, 'experiments', 'anchors_sweep.py'), '--dry-run',
       '--workdir_root', str(tmp_path)], capture_output=True, text=True, check=True, cwd=ROOT)
  lines = [l for l in out.stdout.splitlines() if 'retina_jax.main' in l]
  assert len(lines) == 7
  workdirs = {l.split('--workdir=')[1].split()[0] for l in lines}
  assert len(workdirs) == 7
  assert any('--config.anchors.scales=(1.0,)' in l for l in lines)


def _dry_run_workdirs(tmp_path, *args) -> tuple[list[str], list[str]]:
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'scripts', 'sweep.py'), '--dry-run',
       '--workdir_root', str(tmp_path), *args], capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stderr
  lines = [l for l in out.stdout.splitlines() if 'retina_jax.main' in l]
  return [l.split('--workdir=')[1].split()[0] for l in lines], lines


def test_sweep_script_flags_after_dashes_and_experiment_arg_get_their_own_workdirs(tmp_path):
  demo = os.path.join('experiments', 'smoke', 'shapes_demo.py')
  plain, _ = _dry_run_workdirs(tmp_path, demo)
  longer, _ = _dry_run_workdirs(tmp_path, f'{demo}:steps=800')
  sgd, lines = _dry_run_workdirs(tmp_path, f'{demo}:steps=800', '--', '--config.optim.name=sgd',
                                 '--config.optim.base_lr', '0.02')
  # The README's SGD rows: every run gets the flags after `--`...
  assert len(lines) == 5
  assert all(l.endswith('--config.optim.name=sgd --config.optim.base_lr 0.02') for l in lines)
  # ...and no run of one sweep resumes (or re-evaluates) a finished run of another.
  assert len(set(plain) | set(longer) | set(sgd)) == 15
  assert all('optim.name=sgd,optim.base_lr=0.02' in w for w in sgd)


def test_sweep_script_skips_finished_runs_and_resumes_the_others(tmp_path):
  demo = os.path.join('experiments', 'smoke', 'shapes_demo.py')
  workdirs, _ = _dry_run_workdirs(tmp_path, demo)
  for k, workdir in enumerate(workdirs[:3]):  # 0: finished; 1: killed in its final evaluation;
    os.makedirs(os.path.join(workdir, 'checkpoints', '1200'))  # 2: stale metrics of 800 steps.
    with open(os.path.join(workdir, 'checkpoints', '1200', 'commit_success.txt'), 'w') as f:
      f.write('committed')  # Orbax's last file of a step.
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump({'num_train_steps': 1200, 'data': {'eval_split': 'validation'}}, f)
    metrics = os.path.join(workdir, 'metrics_validation.json')
    if k != 1:
      with open(metrics, 'w') as f:
        f.write('{}')
    if k == 2:
      os.utime(metrics, (0, 0))
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'scripts', 'sweep.py'), '--dry-run',
       '--workdir_root', str(tmp_path), demo], capture_output=True, text=True, cwd=ROOT,
      check=True)
  assert out.stdout.count('finished at step 1200 and evaluated: skipped') == 1
  assert out.stdout.count('retina_jax.main') == 4 and f'--workdir={workdirs[0]} ' not in out.stdout


def test_launch_pod_dry_run_prints_gcloud_for_all_workers():
  out = subprocess.run(
      ['bash', os.path.join(ROOT, 'scripts', 'launch_pod.sh'), '--name', 'v4-32', '--zone',
       'us-central2-b', '--skip-plan', '--dry-run', '--', '-m', 'retina_jax.main', '--config',
       'experiments/retinanet_r50_coco.py', '--workdir', 'gs://b/r50'],
      capture_output=True, text=True, check=True)
  assert 'gcloud compute tpus tpu-vm ssh v4-32' in out.stdout
  assert '--worker=all' in out.stdout and 'retina_jax.main' in out.stdout
  assert '--distributed' in out.stdout


def test_launch_pod_runs_a_fused_sweep_with_distributed_among_its_run_flags():
  for after in ([], ['--', '--config.num_train_steps=10']):
    out = _launch_pod('--skip-plan', '--dry-run', '--', 'scripts/sweep.py', 'experiments/x.py',
                      '--fused', *after)
    assert out.returncode == 0, out.stderr
    assert ('scripts/sweep.py experiments/x.py --fused -- '
            f'{"--config.num_train_steps=10 " if after else ""}--distributed') in (
                out.stdout.replace('\\', ''))


def test_launch_pod_plans_a_fused_sweep_as_pod_plan_sweep():
  """A plan refused in seconds (no compile) says the command's sweep was planned, members and
  override included."""
  pytest.importorskip('libtpu', reason='pod_plan needs the TPU runtime (requirements-tpu.txt)')
  out = _launch_pod('--topology', 'v5e:2x2', '--dry-run', '--', 'scripts/sweep.py',
                    '--workdir_root', 'gs://b/s', 'experiments/smoke/shapes_demo.py', '--fused',
                    '--', '--config.batch_size=6')
  assert out.returncode == 1 and 'gcloud' not in out.stdout
  assert '5 fused members: config.batch_size=6 must be a multiple' in out.stderr


# The demo config shrunk to the tiny test model: pod_plan compiles it in seconds.
_TINY_DEMO = ['--config', 'experiments/smoke/shapes_demo.py:batch=8', '--config.data.image_size=64',
              '--config.data.min_size=64', '--config.data.max_size=64',
              '--config.model.fpn_channels=16', '--config.model.head_channels=16',
              '--config.model.head_convs', '1', '--config.eval_batch_size=4']


def _launch_pod(*args):
  return subprocess.run(
      ['bash', os.path.join(ROOT, 'scripts', 'launch_pod.sh'), '--name', 'my-v5e', '--zone', 'z',
       *args], capture_output=True, text=True, cwd=ROOT,
      env=tiny_detector.subprocess_env(PYTHON=sys.executable, JAX_PLATFORMS='cpu'))


def test_launch_pod_plans_the_run_for_the_topology_before_any_gcloud_command():
  pytest.importorskip('libtpu', reason='pod_plan needs the TPU runtime (requirements-tpu.txt)')
  out = _launch_pod('--topology', 'v5e:2x2', '--dry-run', '--', '-m', 'retina_jax.main',
                    *_TINY_DEMO, '--workdir', 'gs://b/demo')
  assert out.returncode == 0, out.stderr
  plan, _, commands = out.stdout.partition('gcloud ')
  assert 'v5e:2x2' in plan and '4 chips' in plan and 'peak' in plan
  assert 'tpu-vm ssh my-v5e' in commands and 'head_convs' in commands


def test_launch_pod_stops_before_gcloud_when_pod_plan_fails():
  pytest.importorskip('libtpu', reason='pod_plan needs the TPU runtime (requirements-tpu.txt)')
  demo = [a.replace(':batch=8', ':batch=6') for a in _TINY_DEMO]  # 6 images over 4 chips.
  out = _launch_pod('--topology', 'v5e:2x2', '--dry-run', '--', '-m', 'retina_jax.main', *demo,
                    '--workdir', 'gs://b/demo')
  assert out.returncode == 1
  assert 'gcloud' not in out.stdout
  assert 'config.batch_size=6 must be a multiple of the data-parallel size 4' in out.stderr
  assert 'stopped before any gcloud command' in out.stderr


def test_launch_pod_needs_a_topology_to_plan_for():
  out = _launch_pod('--dry-run', '--', '-m', 'retina_jax.main', *_TINY_DEMO)
  assert out.returncode == 2 and '--topology' in out.stderr and not out.stdout


def test_launch_pod_setup_copies_the_checkout_without_ignored_files(tmp_path):
  """--setup runs for real against a stand-in gcloud that keeps what would be uploaded."""
  fake = tmp_path / 'bin' / 'gcloud'
  fake.parent.mkdir()
  fake.write_text('#!/bin/bash\necho "$*" >> "$LOG"\n'
                  'for a in "$@"; do case "$a" in *.tar.gz) cp "$a" "$KEEP";; esac; done\n')
  fake.chmod(0o755)
  env = dict(os.environ, PATH=f'{fake.parent}{os.pathsep}{os.environ["PATH"]}',
             LOG=str(tmp_path / 'log'), KEEP=str(tmp_path / 'upload.tar.gz'),
             TMPDIR=str(tmp_path))
  subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'launch_pod.sh'), '--name', 'v4-32',
                  '--zone', 'z', '--skip-plan', '--setup', '--', '-m', 'retina_jax.main'],
                 env=env, check=True, capture_output=True, text=True)
  listing = subprocess.run(['tar', '-tzf', str(tmp_path / 'upload.tar.gz')], check=True,
                           capture_output=True, text=True).stdout.splitlines()
  listing = [f.removeprefix('./') for f in listing]  # Outside a git checkout: tar of '.'.
  assert 'retina_jax/train.py' in listing and 'scripts/launch_pod.sh' in listing
  assert not [f for f in listing if f.startswith(('.venv/', 'workdirs/', '.git/'))]
  log = (tmp_path / 'log').read_text()
  assert '--recurse' not in log  # Into an existing folder that would nest a second copy.
  assert 'tar -xzf retina_jax-setup.tar.gz -C ~/retina_jax' in log
  assert '-r requirements.txt -r requirements-tpu.txt' in log  # The TPU runtime of our jax.
  assert not list(tmp_path.glob('retina_jax-setup-*.tar.gz'))  # The local archive is removed.


def test_coco_experiments_take_the_papers_scale_jitter_and_lsj():
  for name in ('retinanet_r50_coco.py', 'retinanet_r101_coco.py'):
    module = _load(os.path.join(ROOT, 'experiments', name))
    plain = module.get_config(None)
    assert plain.data.train_min_sizes == () and plain.data.scale_jitter == (1.0, 1.0)
    paper = module.get_config('res=800,sched=1.5x,aug=paper')
    assert paper.data.train_min_sizes == (640, 672, 704, 736, 768, 800)  # detectron2's 3x.
    assert paper.data.train_min_size_sampling == 'choice' and paper.num_train_steps == 135_000
    assert (paper.data.min_size, paper.data.max_size) == (800, 1333)  # Evaluation as before.
    assert module.get_config('aug=lsj').data.scale_jitter == (0.1, 2.0)
    with pytest.raises(ValueError, match='augmentation'):
      module.get_config('aug=mosaic')


def _custom_folder(root, categories, splits=('train', 'val')):
  os.makedirs(os.path.join(root, 'annotations'))
  for split in splits:
    with open(os.path.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
      json.dump({'images': [], 'annotations': [],
                 'categories': [{'id': i, 'name': f'c{i}'} for i in categories]}, f)
  return str(root)


def test_custom_data_takes_classes_and_splits_from_the_folder(tmp_path):
  module = _load(os.path.join(ROOT, 'experiments', 'custom_data.py'))
  root = _custom_folder(tmp_path / 'a', (4, 9, 17))
  c = module.get_config(f'root={root},size=400,steps=500,batch=4,backbone=tiny')
  assert c.model.num_classes == 3 and c.data.eval_split == 'val' and c.data.root == root
  assert (c.data.min_size, c.data.max_size, c.data.image_size) == (416, 416, 416)
  assert c.eval_every_steps == 50 and c.keep_best_by == 'AP' and c.num_train_steps == 500
  assert c.model.norm == 'gn' and c.optim.name == 'adamw' and not c.init_from
  pretrained = module.get_config(f'root={root},init=/w/r50.msgpack,backbone=resnet50')
  assert pretrained.init_from == '/w/r50.msgpack' and pretrained.model.norm == 'frozen_bn'
  assert pretrained.model.freeze_at == 2 and pretrained.optim.name == 'sgd'
  other = _custom_folder(tmp_path / 'b', (1,), splits=('train', 'validation'))
  assert module.get_config(f'root={other}').data.eval_split == 'validation'
  lonely = _custom_folder(tmp_path / 'c', (1,), splits=('train',))
  with pytest.raises(FileNotFoundError, match='val=NAME'):
    module.get_config(f'root={lonely}')
  with pytest.raises(FileNotFoundError, match='annotations'):
    module.get_config(f'root={tmp_path / "missing"}')
