"""The one path layer: every file under a workdir, an export, `config.init_from` or a data root.

Local paths and object stores (`gs://bucket/...`) alike go through `etils.epath` (`Path`).

The gs:// backend is chosen here, once: fsspec's gcsfs, not TensorFlow's GCS filesystem, which
epath picks by default whenever TensorFlow is installed (it is: tfds needs it). Both take the
application default credentials on a pod, so nothing needs setting there; only gcsfs (and
tensorstore, orbax's array backend) also reach a GCS emulator: STORAGE_EMULATOR_HOST for gcsfs and
google-cloud-storage (TensorBoard events), TENSORSTORE_GCS_HTTP_URL for tensorstore.
EPATH_USE_TF=true set by the user still wins.

An object store has no append and no rename of a folder, and an object appears whole when its
upload completes. Hence the write rules of the project, the same on local disk:
- `write_atomic`: one file, whole or not at all (local disk: a temporary sibling, then a rename).
- Logs that grow (metrics.jsonl) are rewritten whole, by their one writer (host 0).
- A folder of several files (an export, a generated data set) is complete when its marker file,
  written last, is there (`publish_dir`, `is_complete`); readers treat a folder without it as
  absent. Orbax does the same on gs:// for checkpoints (commit_success.txt).
"""

import os
import tempfile
from typing import Callable

os.environ.setdefault('EPATH_USE_TF', 'false')  # Read by epath at each call: before any I/O.

from etils import epath  # pylint: disable=g-import-not-at-top,wrong-import-position

Path = epath.Path
COMPLETE = 'COMPLETE'  # The marker of `publish_dir`.


def is_url(path) -> bool:
  """Whether `path` names an object store (gs://...) rather than the local file system."""
  return '://' in os.fspath(path)


def absolute(path: str) -> str:
  """Local paths made absolute (so that a bare file name still has a folder); URLs as given."""
  return path if is_url(path) else os.path.abspath(path)


def write_atomic(path, data: bytes | str) -> None:
  """Writes one file so that a reader, or a kill, sees the old content or the new, never part."""
  path = Path(path)
  data = data.encode() if isinstance(data, str) else data
  if is_url(path):
    path.write_bytes(data)  # The object appears when its upload completes.
    return
  tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
  tmp.write_bytes(data)
  tmp.replace(path)


def is_complete(folder) -> bool:
  return (Path(folder) / COMPLETE).exists()


def publish_dir(build: Callable[[str], None], folder) -> None:
  """Runs `build(local_dir)` on an empty local temporary folder, then puts its files into
  `folder` (local or URL; existing files of the same name are replaced, others left alone), and
  the marker last, so that `is_complete(folder)` only holds for a whole set of files.

  `build` may use any writer that wants a local path (PIL, torch.save, TensorFlow).
  """
  folder = Path(folder)
  (folder / COMPLETE).unlink(missing_ok=True)  # Incomplete from the first replaced file on.
  with tempfile.TemporaryDirectory(prefix='retina_jax-') as local:
    build(local)
    for parent, _, files in os.walk(local):
      rel = os.path.relpath(parent, local)
      target = folder if rel == '.' else folder / rel
      target.mkdir(parents=True, exist_ok=True)
      for name in files:
        write_atomic(target / name, Path(parent, name).read_bytes())
  write_atomic(folder / COMPLETE, 'Written last: every file of this folder is complete.\n')
