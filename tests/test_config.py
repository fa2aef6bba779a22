import math
import os
import subprocess
import sys

from retina_jax import config as config_lib


def test_base_config_has_paper_defaults():
  c = config_lib.get_base_config()
  assert (c.loss.gamma, c.loss.alpha) == (2.0, 0.25)
  assert (c.matcher.foreground_iou, c.matcher.background_iou) == (0.5, 0.4)
  assert c.loss.smooth_l1_beta == 0.11
  assert c.postprocess.score_threshold == 0.05
  assert c.postprocess.max_detections == 100
  assert math.isclose(c.box_coder.clamp, math.log(1000 / 16))
  assert len(c.anchors.sizes) == c.model.max_level - c.model.min_level + 1


def test_path_fields_are_typed_strings():
  c = config_lib.get_base_config()
  for value in (c.init_from, c.data.root, c.data.tfds_data_dir):
    assert value == ''


def test_override_of_a_missing_field_stops_with_one_line_naming_the_flag(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = ['--workdir', str(tmp_path)]
  for module, extra in (('retina_jax.main', workdir),
                        ('retina_jax.export', [*workdir, '--out', str(tmp_path)]),
                        ('retina_jax.tools.anchor_coverage', [])):
    out = subprocess.run(
        [sys.executable, '-m', module, '--config', 'experiments/smoke/shapes_demo.py', *extra,
         '--config.loss.gama=1'], capture_output=True, text=True, cwd=root)
    assert out.returncode == 1, out.stderr
    assert 'Traceback' not in out.stderr, out.stderr
    assert '--config.loss.gama=1' in out.stderr and '"gamma"' in out.stderr, out.stderr
