"""Training in landscape / portrait canvases (config.data.train_buckets='orientation'): the real
loop compiles the step once per canvas and trains on both."""

import logging

import numpy as np

from retina_jax import train
from retina_jax.data import pipeline
from tests import test_train


def test_training_runs_in_both_orientation_canvases(tmp_path, caplog):
  config = test_train.tiny_config(str(tmp_path / 'shapes'), **{
      'data.min_size': 64, 'data.max_size': 128, 'data.image_size': 128,
      'data.train_buckets': 'orientation', 'num_train_steps': 8, 'checkpoint_every_steps': 8})
  source = pipeline.create_source(config.data, config.data.train_split)
  loader = pipeline.TrainLoader(source, config.data, config.batch_size, config.seed,
                                process_index=0, process_count=1)
  assert sorted(loader.canvases) == [(64, 128), (128, 64)]
  canvases = [loader.canvas(s) for s in range(8)]
  assert len(set(canvases)) == 2, canvases  # This seed's first 8 steps use both.
  batch = loader.batch(0)
  assert batch['image'].shape == (4, *canvases[0], 3)
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, str(tmp_path / 'work'))
  compiled = [r.getMessage() for r in caplog.records if 'Compiling the train step' in r.getMessage()]
  assert sorted(compiled) == ['Compiling the train step for 128x64 images.',
                              'Compiling the train step for 64x128 images.']
  losses = [r['train/loss'] for r in test_train.read_metrics(str(tmp_path / 'work'))]
  assert len(losses) == 8 and np.all(np.isfinite(losses))
