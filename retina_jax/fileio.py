"""The one path layer: every file under a workdir, an export, `config.init_from` or a data root.

Local paths and object stores (`gs://bucket/...`) alike go through `etils.epath` (`Path`).

The gs:// backend is chosen here, by the first `Path` a process makes: fsspec's gcsfs, not
TensorFlow's GCS filesystem, which epath picks by default whenever TensorFlow is installed (it
is: tfds needs it). Both take the
application default credentials on a pod, so nothing needs setting there; only gcsfs (and
tensorstore, orbax's array backend) also reach a GCS emulator: STORAGE_EMULATOR_HOST for gcsfs,
TENSORSTORE_GCS_HTTP_URL for tensorstore.
EPATH_USE_TF=true set by the user still wins.

An object store has no append and no rename of a folder, and an object appears whole when its
upload completes. Hence the write rules of the project, the same on local disk:
- `write_atomic`: one file, whole or not at all (local disk: a temporary sibling, then a rename).
- Logs that grow (metrics, TensorBoard events) are appended to on local disk; on an object
  store they are cut into chunks (`retina_jax/metrics.py`), the last one rewritten whole.
- A folder of several files (an export, a generated data set) is complete when its marker file,
  written last, is there (`publish`, `is_complete`); readers treat a folder without it as
  absent. Orbax does the same on gs:// for checkpoints (commit_success.txt).
"""

import os
import tempfile
from typing import Callable

from etils import epath

COMPLETE = 'COMPLETE'  # The marker of `publish_dir`.


def Path(*parts) -> epath.Path:  # pylint: disable=invalid-name
  """`epath.Path(*parts)`, with gs:// through gcsfs. epath reads EPATH_USE_TF once per process,
  when it first does I/O on a URL, so it is set here, before any path of the project's exists
  (orbax gets its paths from here too)."""
  os.environ.setdefault('EPATH_USE_TF', 'false')
  return epath.Path(*parts)


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


def forget_listings(path) -> None:
  """Drops this process's cached listings of `path` and its parents. gcsfs keeps them, object
  sizes included, so that an object another process has since rewritten would read as it was,
  or cut short. Local paths (and TensorFlow's GCS file system) cache none."""
  fs = getattr(Path(path)._backend, 'fs', None)  # pylint: disable=protected-access
  if is_url(path) and fs is not None:
    fs(os.fspath(path)).invalidate_cache(os.fspath(path))


def is_complete(folder) -> bool:
  return (Path(folder) / COMPLETE).exists()


def publish(folder, files: dict[str, bytes]) -> None:
  """Writes `files` (name relative to `folder` -> content) into `folder`, local or URL, each with
  `write_atomic`, and the marker last, so that `is_complete(folder)` only holds for a whole set
  of files. Files of the same name are replaced, others left alone."""
  folder = Path(folder)
  (folder / COMPLETE).unlink(missing_ok=True)  # Incomplete from the first replaced file on.
  for name, data in files.items():
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / name, data)
  write_atomic(folder / COMPLETE, 'Written last: every file of this folder is complete.\n')


def publish_dir(build: Callable[[str], None], folder) -> None:
  """`publish` of what `build(local_dir)` writes into an empty local temporary folder: for
  writers that want a local path (PIL, torch.save, TensorFlow)."""
  with tempfile.TemporaryDirectory(prefix='retina_jax-') as local:
    build(local)
    files = {os.path.relpath(os.path.join(parent, name), local): Path(parent, name).read_bytes()
             for parent, _, names in os.walk(local) for name in names}
  publish(folder, files)
