"""The demo: a tiny RetinaNet trained from scratch on the synthetic "shapes" set on a CPU.

  python -m retina_jax.main --config experiments/smoke/shapes_demo.py --workdir workdirs/demo

`make demo` runs exactly this. `get_sweep` is the paper's Table 1b gamma sweep on the same data:
  python scripts/sweep.py experiments/smoke/shapes_demo.py --workdir_root workdirs/sweeps
"""

from retina_jax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=1200, batch=16)
  config = config_lib.get_base_config()
  config.seed = 0
  config.batch_size = arg.batch
  config.num_train_steps = arg.steps
  config.checkpoint_every_steps = 250
  config.eval_every_steps = 0  # Evaluate once, at the end.
  config.log_every_steps = 50
  config.eval_batch_size = 16
  config.num_demo_pictures = 4

  config.model.backbone = 'tiny'
  config.model.num_classes = 5  # The shapes set's five categories.
  config.model.norm = 'gn'  # From scratch: no pretrained statistics to freeze.
  config.model.freeze_at = 0
  config.model.fpn_channels = 64
  config.model.head_channels = 64
  config.model.head_convs = 2
  config.model.dtype = 'float32'  # bf16 only pays off on accelerators.

  config.anchors.sizes = (16.0, 32.0, 64.0, 128.0, 256.0)

  config.data.name = 'shapes'
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.min_size = 128
  config.data.max_size = 128
  config.data.image_size = 128
  config.data.max_boxes = 20
  config.data.num_workers = 2

  # AdamW, not the paper's SGD: from scratch on this short schedule SGD's single learning rate is
  # too low for the focal-loss classifier (whose gradient gamma shrinks) and too high for the
  # rest (LR 0.06 diverged); AdamW's per-parameter step size removes that coupling. Measured on
  # the shapes eval split at 800 steps: SGD (LR 0.02) AP50 0.11, AdamW (LR 0.002) 0.45.
  config.optim.name = 'adamw'
  config.optim.base_lr = 0.002
  config.optim.weight_decay = 0.05  # Decoupled: each step shrinks kernels by LR * 0.05.
  config.optim.base_batch_size = 16
  config.optim.warmup_steps = 100
  config.optim.decay_steps = (int(arg.steps * 0.75), int(arg.steps * 0.9))
  config.optim.grad_clip_norm = 10.0
  return config


def get_sweep(hyper):
  return hyper.zipit([hyper.sweep('config.loss.gamma', [0.0, 0.5, 1.0, 2.0, 5.0]),
                      hyper.sweep('config.loss.alpha', [0.75, 0.5, 0.25, 0.25, 0.25])])
