"""Input data: sources (shapes, coco_format, tfds), category maps, the static-shape pipeline."""

from retina_jax.data.categories import CategoryMap
from retina_jax.data.coco_format import BadImageError
from retina_jax.data.pipeline import (TrainLoader, create_source, eval_batches, normalize_images,
                                      num_eval_batches)
