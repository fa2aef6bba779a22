"""Input data, one job per module (nothing is imported here, so importing a submodule does not
pull in the rest):

  shapes, coco_format, tfds_source   the sources: random access to examples (and sizes)
  categories                         data set category ids <-> contiguous labels
  resize                             the resize rules and their interpolation
  canvas                             the canvases images are padded into
  sampler                            which examples each batch holds (resume, hosts, eval plan)
  augment                            training augmentations, drawn and applied
  preprocess                         one example -> one batch row, in augmentation order
  pipeline                           the plumbing: source factory, threads, prefetch, batches
"""
