"""Export: params-only msgpack, config and category map, and a StableHLO detector that runs
without this code base and gives the same detections as the Python model."""

import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import numpy as np
import pytest

from retina_jax import checkpoint
from retina_jax import export as export_lib
from retina_jax import inference
from retina_jax import saved_config
from retina_jax.data import categories
from tests import tiny_detector

# Runs in a fresh interpreter: only jax, flax.serialization and numpy, never retina_jax. Calls
# every detector of the export on its own canvas's images.
_CONSUMER = textwrap.dedent('''
  import json
  import sys
  import flax.serialization
  import jax
  import numpy as np
  export_dir, io_file = sys.argv[1], sys.argv[2]
  with open(f'{export_dir}/params.msgpack', 'rb') as f:
    variables = flax.serialization.msgpack_restore(f.read())
  with open(f'{export_dir}/signature.json') as f:
    signature = json.load(f)
  files = {'detect.jax_exported'} | {c['file'] for c in signature['canvases'].values()}
  for name in sorted(files):
    with open(f'{export_dir}/{name}', 'rb') as f:
      detect = jax.export.deserialize(bytearray(f.read()))
    inputs = np.load(f'{io_file}.{name}.in.npz')
    out = detect.call(variables, inputs['images'], inputs['image_hw'])
    np.savez(f'{io_file}.{name}.out.npz', **{k: np.asarray(v) for k, v in out.items()})
  assert not any(m.startswith('retina_jax') for m in sys.modules), 'imported retina_jax'
  print('OK')
''')


@pytest.mark.slow
def test_exported_detector_runs_without_our_code(tmp_path):
  config = tiny_detector.tiny_config()
  config.data.min_size = 96  # Orientation canvases 96 x 128 and 128 x 96 besides 128 x 128.
  variables = tiny_detector.random_variables(config)
  cats = tiny_detector.CATEGORIES
  out_dir = str(tmp_path / 'export')
  export_lib.write_export(out_dir, config, variables, cats)  # Any batch size, 3 platforms.
  assert sorted(os.listdir(out_dir)) == sorted([
      'params.msgpack', 'config.json', 'categories.json', 'detect.jax_exported',
      'detect_96x128.jax_exported', 'detect_128x96.jax_exported', 'signature.json', 'COMPLETE'])
  signature = json.loads((tmp_path / 'export' / 'signature.json').read_text())
  assert signature['batch_size'] is None
  assert signature['platforms'] == ['cpu', 'cuda', 'tpu']
  assert signature['canvases'] == {
      'landscape': {'file': 'detect_96x128.jax_exported', 'height': 96, 'width': 128},
      'portrait': {'file': 'detect_128x96.jax_exported', 'height': 128, 'width': 96}}

  io_file = str(tmp_path / 'io')
  canvases = {'detect.jax_exported': (128, 128), 'detect_96x128.jax_exported': (96, 128),
              'detect_128x96.jax_exported': (128, 96)}
  inputs = {}
  for seed, (name, (h, w)) in enumerate(canvases.items()):
    images, image_hw = tiny_detector.random_images(3, max(h, w), seed=seed)
    images, image_hw = images[:, :h, :w], np.minimum(image_hw, [h, w]).astype(np.int32)
    inputs[name] = (np.ascontiguousarray(images), image_hw)
    np.savez(f'{io_file}.{name}.in.npz', images=inputs[name][0], image_hw=image_hw)
  script = tmp_path / 'consumer.py'
  script.write_text(_CONSUMER)
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  env.pop('PYTHONPATH', None)
  proc = subprocess.run([sys.executable, str(script), out_dir, io_file], cwd=str(tmp_path),
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]

  # The child ran on the CPU (JAX_PLATFORMS=cpu): compare on the same backend, also on a GPU
  # machine, where the default device would round differently.
  cpu = jax.devices('cpu')[0]
  detect = inference.make_detect_fn(config)
  for name, (images, image_hw) in inputs.items():
    exported = dict(np.load(f'{io_file}.{name}.out.npz'))
    ours = detect(*jax.device_put((variables, images, image_hw), cpu))
    assert set(exported) == {'boxes', 'scores', 'labels', 'category_ids', 'valid'}
    for k in ('boxes', 'scores', 'labels', 'valid'):
      np.testing.assert_array_equal(exported[k], np.asarray(ours[k]), err_msg=f'{name} {k}')
    assert exported['valid'].any(), 'the tiny model should detect something'
    np.testing.assert_array_equal(exported['category_ids'],
                                  np.asarray(cats.ids)[exported['labels']])


def test_params_config_and_categories_round_trip(tmp_path):
  config = tiny_detector.tiny_config()
  config.postprocess.nms_iou = 0.6  # A non-default value must survive.
  variables = tiny_detector.random_variables(config)
  out_dir = str(tmp_path / 'export')
  export_lib.write_export(out_dir, config, variables, tiny_detector.CATEGORIES, batch_size=1,
                          platforms=('cpu',))

  restored = saved_config.load_params(out_dir)
  assert set(restored) == {'params', 'batch_stats'}
  flat_in = dict(_flatten(variables))
  flat_out = dict(_flatten(restored))
  assert flat_in.keys() == flat_out.keys()
  for k, v in flat_in.items():
    np.testing.assert_array_equal(flat_out[k], v, err_msg=k)

  loaded = saved_config.load(out_dir)
  assert loaded.to_dict() == config.to_dict()
  assert isinstance(loaded.anchors.sizes, tuple)  # Typed as in the base config, not a list.
  assert saved_config.resolve_categories(loaded, out_dir) == tiny_detector.CATEGORIES
  signature = json.loads((tmp_path / 'export' / 'signature.json').read_text())
  assert signature['batch_size'] == 1 and signature['image_size'] == 128
  assert signature['platforms'] == ['cpu']


def test_per_image_canvases_export_the_square_detector_only(tmp_path):
  config = tiny_detector.tiny_config()
  config.data.eval_buckets = 'torchvision'  # A canvas per image size: no fixed set to export.
  out_dir = tmp_path / 'export'
  export_lib.write_export(str(out_dir), config, tiny_detector.random_variables(config),
                          tiny_detector.CATEGORIES, platforms=('cpu',))
  assert [p.name for p in out_dir.glob('*.jax_exported')] == ['detect.jax_exported']
  assert json.loads((out_dir / 'signature.json').read_text())['canvases'] == {}


def test_config_categories_take_precedence(tmp_path):
  config = tiny_detector.tiny_config()
  tv = categories.torchvision_coco_v1()
  assert tv.ids == tuple(range(91)) and tv.names[1] == 'person' and tv.names[90] == 'toothbrush'
  config.categories = tv.to_json()
  (tmp_path / 'categories.json').write_text(tiny_detector.CATEGORIES.to_json())
  assert saved_config.resolve_categories(config, str(tmp_path)) == tv


def test_saved_config_flag_injection():
  argv = ['prog', '--workdir', '/w', '--config.seed=3']
  injected = saved_config.with_saved_config(argv, '/w')
  assert injected[1].startswith('--config=') and injected[1].endswith('saved_config.py:/w')
  assert injected[2:] == argv[1:]
  given = ['prog', '--config=x.py', '--workdir=/w']
  assert saved_config.with_saved_config(given, '/w') == given
  assert saved_config.flag_value(['p', '--params=/e'], 'params') == '/e'
  assert saved_config.flag_value(['p', '--params', '/e'], 'params') == '/e'


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), np.asarray(v)


@pytest.mark.slow
def test_export_cli_from_checkpoint_then_evaluate_exported(tmp_path):
  from tests import test_eval  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'coco'
  gt = tiny_detector.write_coco_dir(str(root))
  config = tiny_detector.coco_dir_config(root)
  variables = tiny_detector.random_variables(config)
  workdir, out = tmp_path / 'run', tmp_path / 'exported'
  test_eval._write_checkpoint(workdir, variables, step=3)  # pylint: disable=protected-access
  (workdir / 'config.json').write_text(config.to_json_best_effort())
  env = tiny_detector.subprocess_env()
  proc = subprocess.run([sys.executable, '-m', 'retina_jax.export', f'--workdir={workdir}',
                         f'--out={out}'], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  flat_in = dict(_flatten(variables))
  flat_out = dict(_flatten(saved_config.load_params(str(out))))
  assert flat_in.keys() == flat_out.keys()  # Parameters only: no step, no optimizer state.
  for k, v in flat_in.items():
    np.testing.assert_array_equal(flat_out[k], v, err_msg=k)
  assert saved_config.load_categories(str(out)) == tiny_detector.CATEGORIES
  # torchvision has no tiny ResNet: one line naming the field, nothing written.
  proc = subprocess.run([sys.executable, '-m', 'retina_jax.export', f'--workdir={workdir}',
                         f'--out={tmp_path / "tv"}', '--format=torchvision'], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "config.model.backbone='tiny'" in proc.stderr, proc.stderr
  assert 'Traceback' not in proc.stderr and not (tmp_path / 'tv').exists()
  # --checkpoint=best exports the one config.keep_best_by kept, not the newest.
  halved = jax.tree.map(lambda x: x / 2, variables)
  assert checkpoint.save_if_best(checkpoint.make_best_manager(str(workdir), 'AP'), 'AP', 0.5,
                                 types.SimpleNamespace(step=2, **halved))
  proc = subprocess.run([sys.executable, '-m', 'retina_jax.export', f'--workdir={workdir}',
                         f'--out={tmp_path / "best"}', '--checkpoint=best', '--platforms=cpu'],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Exported step 2' in proc.stdout
  for k, v in _flatten(saved_config.load_params(str(tmp_path / 'best'))):
    np.testing.assert_array_equal(v, dict(_flatten(halved))[k], err_msg=k)

  # The export is all evaluation needs: no --config, no workdir.
  proc = subprocess.run([sys.executable, '-m', 'retina_jax.evaluate', f'--params={out}'],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / 'detections_val.json').read_text())
  assert {r['image_id'] for r in results} == {im['id'] for im in gt['images']}
  assert 'AP75' in proc.stdout

  # The parameters file itself, named from inside the export (its folder is then '').
  (out / 'detections_val.json').unlink()
  proc = subprocess.run([sys.executable, '-m', 'retina_jax.evaluate',
                         f'--params={saved_config.PARAMS_FILE}'], cwd=str(out), env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads((out / 'detections_val.json').read_text()) == results
  image = root / 'val' / gt['images'][0]['file_name']
  proc = subprocess.run([sys.executable, '-m', 'retina_jax.predict',
                         f'--params={saved_config.PARAMS_FILE}', f'--image={image}',
                         '--json=p.json'], cwd=str(out), env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads((out / 'p.json').read_text())['detections']
  # A typo in an override is one line naming the flag, in every entry point.
  proc = subprocess.run([sys.executable, '-m', 'retina_jax.evaluate', f'--params={out}',
                         '--config.postprocess.score_treshold=0.1'], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and 'score_treshold' in proc.stderr
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]


def _cuda_devices():
  try:
    return jax.devices('cuda')
  except RuntimeError:
    return []


@pytest.mark.skipif(not _cuda_devices(), reason='needs a CUDA device (run with '
                    'JAX_PLATFORMS=cuda,cpu on a GPU machine)')
def test_exported_detector_on_gpu_matches_cpu(tmp_path):
  """The one export (lowered here for cpu, cuda, tpu) runs on a GPU with the CPU's detections."""
  config = tiny_detector.tiny_config()
  variables = tiny_detector.random_variables(config)
  out_dir = str(tmp_path / 'export')
  export_lib.write_export(out_dir, config, variables, tiny_detector.CATEGORIES)
  with open(os.path.join(out_dir, 'detect.jax_exported'), 'rb') as f:
    detect = jax.export.deserialize(bytearray(f.read()))
  params = saved_config.load_params(out_dir)
  images, image_hw = tiny_detector.random_images(3, config.data.image_size)
  outs = []
  for device in (jax.devices('cpu')[0], _cuda_devices()[0]):
    args = jax.device_put((params, images, image_hw), device)
    outs.append(jax.tree.map(np.asarray, detect.call(*args)))
  cpu, gpu = outs
  np.testing.assert_array_equal(gpu['valid'].sum(1), cpu['valid'].sum(1))
  # Sorted scores and the best box per image: robust to the order of near-ties in NMS.
  np.testing.assert_allclose(np.sort(gpu['scores'], 1), np.sort(cpu['scores'], 1), atol=1e-3)
  np.testing.assert_allclose(gpu['boxes'][:, 0], cpu['boxes'][:, 0], atol=0.1)


def test_categories_come_from_the_workdir_when_the_config_file_has_none(tmp_path):
  # `export --config experiments/<file>.py --workdir DIR`: the experiment file has no map, DIR's
  # config.json has the training data's; the eval split of the experiment's data set must not
  # be asked (it may be another data set with as many classes).
  stored = tiny_detector.tiny_config()
  stored.categories = tiny_detector.CATEGORIES.to_json()
  (tmp_path / 'config.json').write_text(stored.to_json_best_effort())
  config = tiny_detector.tiny_config()
  config.data.name = 'no_such_data_set'
  assert saved_config.resolve_categories(config, str(tmp_path)) == tiny_detector.CATEGORIES
