"""TF SavedModel for TF Serving: a uint8 image of any size in, its detections in its pixels out.

  python -m retina_jax.export --workdir DIR --out OUT --format saved_model

Signature 'serving_default' (one image per call, as the TF Object Detection API's):
  images          uint8 [1, H, W, 3] RGB, any H and W
  -> boxes        float32 [1, D, 4] (x1, y1, x2, y2) in the original image's pixels
     scores       float32 [1, D]
     category_ids int32 [1, D] the data set's category ids
     labels       int32 [1, D] contiguous labels (categories.json names them)
     num_detections int32 [1]: rows 0..num_detections-1 are the detections, best first; the
                  rest are zeros. D = config.postprocess.max_detections.
Inside, what `retina_jax.predict` computes: the resize of `preprocess.preprocess` (PIL's bilinear,
re-done in TF ops: `pil_resize`), the padding into the canvas evaluation uses
(`canvas.eval_canvases`: landscape or portrait by a tf.cond), the detector converted with
jax2tf (StableHLO in an XlaCallModule op, lowered for each platform asked for, the parameters as
the SavedModel's variables), and `inference.to_original_coords`.
Writing needs tensorflow (requirements.txt); serving needs only TensorFlow.
"""

import contextlib
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from retina_jax import inference
from retina_jax.data import canvas as canvas_lib
from retina_jax.data.categories import CategoryMap

# Pillow's fixed point for 8-bit images (Resample.c: PRECISION_BITS = 32 - 8 - 2).
_PRECISION_BITS = 22


def _pil_taps(tf, in_size, out_size):
  """Pillow's bilinear coefficients along one axis (Resample.c precompute_coeffs and
  normalize_coeffs_8bpc, in float64 as there): -> (first input index [out] int32, fixed-point
  weights [out, K] float64 holding integers, K taps)."""
  in_f = tf.cast(in_size, tf.float64)
  scale = in_f / tf.cast(out_size, tf.float64)
  support = tf.maximum(scale, 1.0)  # The bilinear filter's support 1, times the filter scale.
  center = (tf.cast(tf.range(out_size), tf.float64) + 0.5) * scale
  xmin = tf.maximum(tf.floor(center - support + 0.5), 0.0)
  xmax = tf.minimum(tf.floor(center + support + 0.5), in_f)
  ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
  x = xmin[:, None] + tf.cast(tf.range(ksize), tf.float64)[None, :]  # [out, K] input index
  w = tf.maximum(1.0 - tf.abs((x - center[:, None] + 0.5) * (1.0 / support)), 0.0)
  w = tf.where(x < xmax[:, None], w, 0.0)
  # Pillow sums the taps one after the other; another order could move a weight by an ulp.
  total = tf.foldl(lambda acc, col: acc + col, tf.transpose(w), initializer=tf.zeros_like(center))
  k = tf.where(total[:, None] != 0.0, w / total[:, None], w)
  return tf.cast(xmin, tf.int32), tf.floor(k * (1 << _PRECISION_BITS) + 0.5)


def _pil_pass(tf, x, out_size, axis: int):
  """One fixed-point pass of x [H, W, C] float64 (integers 0..255) along axis 0 or 1."""
  first, k = _pil_taps(tf, tf.shape(x)[axis], out_size)
  index = tf.minimum(first[:, None] + tf.range(tf.shape(k)[1])[None, :], tf.shape(x)[axis] - 1)
  taps = tf.gather(x, index, axis=axis)  # axis 0: [out, K, W, C]; axis 1: [H, out, K, C]
  k = k[:, :, None, None] if axis == 0 else k[None, :, :, None]
  # Sums of products of integers below 2**31: exact in float64, in any order.
  total = tf.reduce_sum(taps * k, axis=axis + 1) + (1 << (_PRECISION_BITS - 1))
  return tf.clip_by_value(tf.floor(total / (1 << _PRECISION_BITS)), 0.0, 255.0)


def pil_resize(tf, image, out_h, out_w):
  """uint8 [H, W, 3] -> uint8 [out_h, out_w, 3], `PIL.Image.resize(..., Image.BILINEAR)` in TF
  ops: Pillow's two passes, each rounded to uint8, in its fixed point and in its order. Pillow
  13 (Resample.c, ImagingResampleInner) runs the vertical pass first when the height shrinks by
  more than twice as many pixels as the width, else the horizontal one (as every Pillow before
  it did); the order moves a quarter of the pixels by one level."""
  x = tf.cast(image, tf.float64)
  shrink_h = tf.shape(image)[0] - out_h
  shrink_w = tf.shape(image)[1] - out_w
  resized = tf.cond(
      (shrink_h > 0) & (shrink_h > 2 * shrink_w),
      lambda: _pil_pass(tf, _pil_pass(tf, x, out_h, axis=0), out_w, axis=1),
      lambda: _pil_pass(tf, _pil_pass(tf, x, out_w, axis=1), out_h, axis=0))
  return tf.cast(resized, tf.uint8)


@contextlib.contextmanager
def _stablehlo_for_tensorflow():
  """jax 0.10.2 serializes StableHLO for consumers at most 4 weeks older (StableHLO 1.15);
  TensorFlow 2.21's XlaCallModule reads up to 1.13.7, which the 12-week window gives. jax has no
  public switch for the window, so its serializer is swapped while converting."""
  from jax._src.export import _export  # pylint: disable=g-import-not-at-top
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  from jax._src.lib.mlir.dialects import hlo  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  original = _export._module_to_bytecode  # pylint: disable=protected-access
  version = hlo.get_version_from_compatibility_requirement(
      hlo.StablehloCompatibilityRequirement.WEEK_12)
  _export._module_to_bytecode = lambda module: _jax.mlir.serialize_portable_artifact(  # pylint: disable=protected-access
      module, version, xla_bridge.get_backend().serialize_with_sdy)
  try:
    yield
  finally:
    _export._module_to_bytecode = original  # pylint: disable=protected-access


def write_saved_model(out_dir: str, config, variables, categories: CategoryMap,
                      platforms: Sequence[str] = ('cpu', 'cuda', 'tpu')) -> str:
  """Writes the SavedModel (module docstring) into out_dir; returns it.

  variables: plain nested dicts of numpy arrays (`export.to_plain`).
  """
  data = config.data
  if data.resize != 'pil':
    raise ValueError(f'config.data.resize={data.resize!r}: the SavedModel re-does in TF ops only '
                     "the 'pil' resize; export with --config.data.resize=pil or --format jax.")
  canvases = canvas_lib.eval_canvases(data)
  if not canvases:
    raise ValueError(f'config.data.eval_buckets={data.eval_buckets!r}: a canvas per image size '
                     'cannot be served from one SavedModel; export with '
                     '--config.data.eval_buckets=orientation or square.')
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError('--format saved_model needs tensorflow: pip install -r '
                      'requirements.txt') from None
  detect = inference.make_detect_fn(config)
  cat_ids = np.asarray(categories.ids, np.int32)

  def serve(variables, images, image_hw):
    dets = detect(variables, images, image_hw)
    dets['category_ids'] = jnp.asarray(cat_ids)[dets['labels']]
    return dets

  with _stablehlo_for_tensorflow():
    # One StableHLO module per canvas: jax2tf lowers per input shape.
    converted = jax2tf.convert(serve, native_serialization_platforms=tuple(platforms))
    module = tf.Module()
    module.params = tf.nest.map_structure(tf.Variable, variables)
    s = float(data.image_size)

    @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8, name='images')],
                 autograph=False)
    def serving(images):
      image = images[0]
      h, w = tf.shape(image)[0], tf.shape(image)[1]
      hf, wf = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
      # resize.resize_scale and resized_hw, in float64 as Python computes them.
      scale = tf.minimum(tf.minimum(float(data.min_size) / tf.minimum(hf, wf),
                                    float(data.max_size) / tf.maximum(hf, wf)),
                         s / tf.maximum(hf, wf))
      side = lambda v: tf.cast(tf.minimum(tf.maximum(tf.round(v * scale), 1.0), s), tf.int32)
      nh, nw = side(hf), side(wf)
      resized = pil_resize(tf, image, nh, nw)

      def run(name):
        hc, wc = canvases[name]
        padded = tf.pad(resized, [[0, hc - nh], [0, wc - nw], [0, 0]])
        return converted(module.params, tf.ensure_shape(padded[None], [1, hc, wc, 3]),
                         tf.stack([nh, nw])[None])

      if len(canvases) == 1:
        dets = run(next(iter(canvases)))
      else:  # canvas.canvas_for: landscape when width >= height.
        dets = tf.cond(w >= h, lambda: run('landscape'), lambda: run('portrait'))
      # inference.to_original_coords, then predict's order: valid ones by score, stable.
      boxes = dets['boxes'][0] / tf.cast(scale, tf.float32)
      boxes = tf.clip_by_value(boxes, 0.0, tf.cast(tf.stack([w, h, w, h]), tf.float32))
      valid = dets['valid'][0]
      order = tf.argsort(tf.where(valid, dets['scores'][0], -np.inf), direction='DESCENDING',
                         stable=True)
      keep = tf.gather(valid, order)
      pick = lambda x: tf.where(keep[:, None] if x.shape.rank == 2 else keep,
                                tf.gather(x, order), tf.zeros_like(x))[None]
      return {'boxes': pick(boxes), 'scores': pick(dets['scores'][0]),
              'category_ids': pick(dets['category_ids'][0]), 'labels': pick(dets['labels'][0]),
              'num_detections': tf.reduce_sum(tf.cast(valid, tf.int32))[None]}

    module.serving = serving
    tf.saved_model.save(module, out_dir, signatures={'serving_default': serving})
  return out_dir
