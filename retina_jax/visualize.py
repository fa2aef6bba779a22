"""Pictures of detections: boxes, class names and scores drawn with PIL."""

import io
import posixpath
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from retina_jax import fileio

# Distinct, readable colours; class k gets _PALETTE[k % len(_PALETTE)].
_PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
            (0, 128, 128), (220, 190, 255), (170, 110, 40), (128, 0, 0), (170, 255, 195),
            (128, 128, 0), (0, 0, 128), (255, 255, 255))


def draw_detections(image, boxes, scores, labels, names: Sequence[str] | None = None,
                    score_threshold: float = 0.0, valid=None,
                    min_side: int = 0) -> Image.Image:
  """Draws detections on a copy of `image`.

  Args:
    image: [H, W, 3] uint8 RGB array or a PIL image (converted to RGB).
    boxes: [D, 4] (x1, y1, x2, y2) in the image's pixels.
    scores: [D] float.
    labels: [D] int, contiguous labels (index into `names`).
    names: label -> name; the label number is printed when None.
    score_threshold: only detections with score >= this are drawn (display only).
    valid: [D] bool; all valid when None.
    min_side: pictures whose shorter side is below this are enlarged by a whole factor (pixels
      kept sharp) before drawing, so that labels stay legible on small images.
  Returns:
    A new RGB PIL image, highest scores drawn last (on top).
  """
  picture = (image.convert('RGB') if isinstance(image, Image.Image)
             else Image.fromarray(np.asarray(image, np.uint8)).convert('RGB')).copy()
  factor = max(1, -(-min_side // min(picture.size))) if min_side else 1
  if factor > 1:
    picture = picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)
  draw = ImageDraw.Draw(picture)
  font = ImageFont.load_default()
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4) * factor
  scores = np.asarray(scores, np.float32).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  keep = scores >= score_threshold
  if valid is not None:
    keep &= np.asarray(valid, bool).reshape(-1)
  line = max(1, round(min(picture.size) / 300))
  for i in np.flatnonzero(keep)[np.argsort(scores[keep], kind='stable')]:
    colour = _PALETTE[int(labels[i]) % len(_PALETTE)]
    x1, y1, x2, y2 = (float(v) for v in boxes[i])
    draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)
    name = names[int(labels[i])] if names is not None else str(int(labels[i]))
    text = f'{name} {scores[i]:.2f}'
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left, bottom - top + 2
    ty = y1 - th if y1 - th >= 0 else y1  # Above the box unless that leaves the picture.
    draw.rectangle([x1, ty, x1 + tw + 4, ty + th], fill=colour)
    draw.text((x1 + 2, ty - top + 1), text, fill=(0, 0, 0), font=font)
  return picture


def grid(pictures: Sequence[Image.Image], columns: int = 4, cell: int = 320) -> Image.Image:
  """Tiles pictures (each shrunk to fit a cell x cell square) into one image, row by row."""
  if not pictures:
    raise ValueError('grid() needs at least one picture.')
  rows = -(-len(pictures) // columns)
  cols = min(columns, len(pictures))
  sheet = Image.new('RGB', (cols * cell, rows * cell), (32, 32, 32))
  for k, pic in enumerate(pictures):
    thumb = pic.copy()
    thumb.thumbnail((cell, cell))
    sheet.paste(thumb, ((k % cols) * cell, (k // cols) * cell))
  return sheet


def save(picture: Image.Image, path: str) -> None:
  """Writes `picture` to `path` (local or gs://) in the format its extension names (.png, .jpg)."""
  ext = posixpath.splitext(str(path))[1].lower()
  data = io.BytesIO()
  picture.save(data, format=Image.registered_extensions()[ext])
  fileio.write_atomic(path, data.getvalue())
