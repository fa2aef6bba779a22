"""The write rules of the path layer on local disk (tests/test_gcs.py runs them on gs://)."""

import os

import flax.serialization
import numpy as np
import pytest

from retina_jax import fileio
from retina_jax import saved_config


def test_gs_goes_through_fsspec_not_tensorflow():
  # TensorFlow's GCS file system ignores STORAGE_EMULATOR_HOST; gcsfs honours it.
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  assert fileio.Path('gs://bucket/workdir/config.json')._backend is backend.fsspec_backend


def test_write_atomic_replaces_whole_and_leaves_no_temporary_file(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  fileio.write_atomic(path, 'first\n')
  fileio.write_atomic(str(path), b'second\n')
  assert path.read_text() == 'second\n'
  assert os.listdir(tmp_path) == ['metrics.jsonl']


def test_a_folder_is_complete_only_after_its_last_publish(tmp_path):
  folder = tmp_path / 'export'
  params = {'params': {'w': np.arange(3, dtype=np.float32)}}
  files = {saved_config.PARAMS_FILE: flax.serialization.msgpack_serialize(params),
           'sub/notes.txt': b'x'}
  fileio.publish(folder, files)
  assert fileio.is_complete(folder) and (folder / 'sub' / 'notes.txt').read_bytes() == b'x'
  np.testing.assert_array_equal(saved_config.load_params(str(folder))['params']['w'], [0, 1, 2])

  # An export killed while writing has no marker: it is refused, not half read.
  (folder / fileio.COMPLETE).unlink()
  with pytest.raises(FileNotFoundError, match='incomplete'):
    saved_config.load_params(str(folder / saved_config.PARAMS_FILE))
  fileio.publish(folder, files)  # Writing it again completes it.
  assert fileio.is_complete(folder)


def test_publish_dir_takes_what_a_local_writer_wrote(tmp_path):
  def build(local):
    with open(os.path.join(local, 'a.bin'), 'wb') as f:
      f.write(b'\0\1')
  fileio.publish_dir(build, str(tmp_path / 'out'))
  assert sorted(os.listdir(tmp_path / 'out')) == ['COMPLETE', 'a.bin']
  assert (tmp_path / 'out' / 'a.bin').read_bytes() == b'\0\1'
