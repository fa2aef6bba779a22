"""gs:// end to end against a local GCS emulator: training with checkpoints and metrics, a kill
and resume that ends as on local disk, evaluate, export and predict from the exported gs:// folder.

Every command is the real one in its own process, with only the emulator's variables set
(tests/gcs_emulator.py), as a pod has only its credentials.
"""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import flax.serialization
import flax.traverse_util
import jax
import numpy as np
from PIL import Image
import pytest

from retina_jax import checkpoint as ckpt
from tests import gcs_emulator
from tests.test_train import ROOT, TINY, command_line, env_with_devices, read_metrics

pytestmark = pytest.mark.skipif(
    not gcs_emulator.available(),
    reason='gcp-storage-emulator is not installed (pip install -r requirements-dev.txt)')

BUCKET = f'gs://{gcs_emulator.BUCKET}'
OVERRIDES = {**TINY, 'num_train_steps': 6}


@pytest.fixture(scope='module')
def emulator():
  with gcs_emulator.running() as url, pytest.MonkeyPatch.context() as mp:
    for key, value in gcs_emulator.env(url).items():
      mp.setenv(key, value)  # This process reads the bucket too (orbax, fileio).
    yield url


def _env(cache_dir) -> dict[str, str]:
  """The children's environment: os.environ (with the emulator's variables of the fixture), 2
  devices, and one compilation cache, so that only the first process compiles the train step."""
  return {**env_with_devices(2), 'JAX_COMPILATION_CACHE_DIR': str(cache_dir),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
  proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _committed_steps(url: str, prefix: str) -> list[int]:
  """Steps whose checkpoint orbax has committed (on gs:// it writes commit_success.txt last)."""
  committed = (re.fullmatch(rf'{prefix}/checkpoints/(\d+)/commit_success\.txt', n)
               for n in gcs_emulator.names(url, f'{prefix}/checkpoints/'))
  return sorted(int(m.group(1)) for m in committed if m)


@pytest.mark.slow
def test_gs_workdir_train_kill_resume_evaluate_export_predict(emulator, tmp_path):
  url, wd = emulator, 'run'
  gs_wd = f'{BUCKET}/{wd}'
  env = _env(tmp_path / 'jax_cache')
  gs_run = command_line({**OVERRIDES, 'data.root': f'{BUCKET}/shapes'}, gs_wd)
  log = tmp_path / 'killed.log'
  with open(log, 'w') as f:
    killed = subprocess.Popen(gs_run, env=env, cwd=ROOT, stdout=f, stderr=f)
  deadline = time.time() + 300
  while time.time() < deadline and killed.poll() is None:
    if any(m['step'] >= 3 for m in read_metrics(gs_wd)) and _committed_steps(url, wd):
      break
    time.sleep(0.2)
  assert killed.poll() is None, f'ended before it could be killed: {log.read_text()[-3000:]}'
  os.kill(killed.pid, signal.SIGKILL)
  killed.wait()

  # The reference on local disk runs beside the resumed one.
  local = str(tmp_path / 'local')
  reference = subprocess.Popen(command_line({**OVERRIDES, 'data.root': str(tmp_path)}, local),
                               env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
  resumed = _run(gs_run, env)
  _, err = reference.communicate(timeout=300)
  assert reference.returncode == 0, err[-3000:]
  assert 'resumed' in resumed.stderr
  # Every step logged once, with the losses of the uninterrupted local run; same parameters.
  gs_metrics, local_metrics = read_metrics(gs_wd), read_metrics(local)
  assert [m['step'] for m in gs_metrics] == list(range(1, 7))
  np.testing.assert_allclose([m['train/loss'] for m in gs_metrics],
                             [m['train/loss'] for m in local_metrics], rtol=1e-6)
  a, step_a = ckpt.restore_variables(local)
  b, step_b = ckpt.restore_variables(gs_wd)
  assert step_a == step_b == 6
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert gcs_emulator.names(url, f'{wd}/tensorboard/')  # Event files in the bucket.

  # evaluate writes what the final evaluation of training wrote (same checkpoint) into gs://.
  outputs = ('detections_validation.json', 'metrics_validation.json')
  trained = {name: json.loads(gcs_emulator.read(url, f'{wd}/{name}')) for name in outputs}
  for name in outputs:
    gcs_emulator.delete(url, f'{wd}/{name}')
  _run([sys.executable, '-m', 'retina_jax.evaluate', f'--workdir={gs_wd}'], env)
  assert {name: json.loads(gcs_emulator.read(url, f'{wd}/{name}')) for name in outputs} == trained

  # export into gs://, then predict from there on an image in the bucket, writing to the bucket.
  _run([sys.executable, '-m', 'retina_jax.export', f'--workdir={gs_wd}', f'--out={BUCKET}/export',
        '--platforms=cpu'], env)
  assert 'export/COMPLETE' in gcs_emulator.names(url, 'export/')
  exported = flax.serialization.msgpack_restore(gcs_emulator.read(url, 'export/params.msgpack'))
  flat = lambda tree: flax.traverse_util.flatten_dict(tree, sep='/')
  assert flat(exported).keys() == flat(b).keys()
  for key, value in flat(b).items():
    np.testing.assert_array_equal(flat(exported)[key], value, err_msg=key)
  image = next(n for n in gcs_emulator.names(url, 'shapes/') if n.endswith('validation/000001.jpg'))
  _run([sys.executable, '-m', 'retina_jax.predict', f'--params={BUCKET}/export',
        f'--image={BUCKET}/{image}', f'--json={BUCKET}/predict/p.json',
        f'--out={BUCKET}/predict/p.png'], env)
  prediction = json.loads(gcs_emulator.read(url, 'predict/p.json'))
  with Image.open(io.BytesIO(gcs_emulator.read(url, f'{image}'))) as im:
    size = im.size
  assert prediction['image'] == f'{BUCKET}/{image}'
  assert (prediction['width'], prediction['height']) == size
  with Image.open(io.BytesIO(gcs_emulator.read(url, 'predict/p.png'))) as im:
    assert im.format == 'PNG' and im.size == size
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))  # Nothing went to a local 'gs:' folder.
