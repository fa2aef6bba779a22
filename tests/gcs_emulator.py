"""A local GCS server (gcp-storage-emulator) on a free loopback port, and what points every
client of the project at it: gcsfs and google-cloud-storage (STORAGE_EMULATOR_HOST), tensorstore
(TENSORSTORE_GCS_HTTP_URL). Objects are read back over the JSON API directly, without gcsfs and
its caches, so that a test sees what really is in the bucket.

  .venv/bin/python -m tests.gcs_emulator [--port P]   # serves gs://retina-jax-test until Ctrl-C

The emulator's downloads lack the x-goog-generation header that real GCS sends; tensorstore then
reads every object's generation as 0, and orbax's OCDBT checkpoints fail ("Malformed
StorageGeneration"). `serve` adds the header.
"""

import argparse
import contextlib
from http import HTTPStatus
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

BUCKET = 'retina-jax-test'


def available() -> bool:
  return importlib.util.find_spec('gcp_storage_emulator') is not None


def env(url: str) -> dict[str, str]:
  return {
      'STORAGE_EMULATOR_HOST': url,
      'TENSORSTORE_GCS_HTTP_URL': url,
      # gcsfs would ask the storage control API (absent from the emulator) for each bucket's
      # layout, warn and fall back to what this selects at once.
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
  }


@contextlib.contextmanager
def running(bucket: str = BUCKET):
  """Yields the emulator's URL (http://127.0.0.1:PORT) with `bucket` created, in memory."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen(
      [sys.executable, '-m', 'tests.gcs_emulator', '--port', str(port), '--bucket', bucket],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f'http://127.0.0.1:{port}'
  try:
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f'{url}/storage/v1/b/{bucket}', timeout=1).close()
        break
      except (urllib.error.URLError, ConnectionError):
        if time.time() > deadline or proc.poll() is not None:
          raise RuntimeError(f'gcp-storage-emulator did not start on {url}') from None
        time.sleep(0.1)
    yield url
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def names(url: str, prefix: str, bucket: str = BUCKET) -> list[str]:
  """Names of the objects under `prefix` (no leading gs://bucket/)."""
  found, token = [], ''
  while True:
    query = urllib.parse.urlencode({'prefix': prefix, **({'pageToken': token} if token else {})})
    with urllib.request.urlopen(f'{url}/storage/v1/b/{bucket}/o?{query}', timeout=30) as r:
      page = json.load(r)
    found += [item['name'] for item in page.get('items', [])]
    token = page.get('nextPageToken', '')
    if not token:
      return sorted(found)


def read(url: str, name: str, bucket: str = BUCKET) -> bytes | None:
  """The object's bytes, None if there is none."""
  quoted = urllib.parse.quote(name, safe='')
  try:
    with urllib.request.urlopen(f'{url}/storage/v1/b/{bucket}/o/{quoted}?alt=media',
                                timeout=30) as r:
      return r.read()
  except urllib.error.HTTPError as e:
    if e.code == 404:
      return None
    raise


def delete(url: str, name: str, bucket: str = BUCKET) -> None:
  quoted = urllib.parse.quote(name, safe='')
  request = urllib.request.Request(f'{url}/storage/v1/b/{bucket}/o/{quoted}', method='DELETE')
  urllib.request.urlopen(request, timeout=30).close()


def serve(port: int, bucket: str = BUCKET) -> None:
  """Runs the emulator on 127.0.0.1:port in memory, downloads with their generation header."""
  import logging  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top

  original = objects.download

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = obj['generation']
      response['x-goog-metageneration'] = obj['metageneration']

  objects.download = download  # objects.get calls it for ?alt=media.
  for _, methods in server.HANDLERS:
    for method, handler in methods.items():
      if handler is original:
        methods[method] = download
  logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)
  server.create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket).run()


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description='A local GCS emulator for retina_jax tests.')
  parser.add_argument('--port', type=int, default=9023)
  parser.add_argument('--bucket', default=BUCKET)
  args = parser.parse_args()
  print(f'gs://{args.bucket} at http://127.0.0.1:{args.port}; set:', flush=True)
  for key, value in env(f'http://127.0.0.1:{args.port}').items():
    print(f'  export {key}={value}', flush=True)
  serve(args.port, args.bucket)
