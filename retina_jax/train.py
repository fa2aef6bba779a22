"""Training: one jitted, sharded step `(state, batch) -> (state, metrics)` and the loop around it.

The step runs under `jax.jit` with `NamedSharding`s over a `Mesh` of every device of every host:
the global batch is split over the 'data' axis, the state is replicated and donated. Matching,
the loss and its global foreground normaliser all happen inside the step. The host only syncs
at log, checkpoint and evaluation steps.
"""

import functools
import logging
import types
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from retina_jax import anchors as anchors_lib
from retina_jax import checkpoint as ckpt
from retina_jax import fileio
from retina_jax import losses
from retina_jax import metrics as metrics_lib
from retina_jax import models
from retina_jax import optim
from retina_jax import pretrained as pretrained_lib
from retina_jax import run_control
from retina_jax import sharding as sharding_lib
from retina_jax import sizes
from retina_jax.data import pipeline
from retina_jax.data import preprocess
from retina_jax.data import resize
from retina_jax.evaluation import background as background_lib
from retina_jax.evaluation import coco_eval
from retina_jax.evaluation import evaluator


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: steps done.
  params: Any
  batch_stats: Any
  opt_state: Any
  first_bad_step: jax.Array  # int32 scalar: first step with a non-finite loss or gradient, or -1.


def image_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
  return (config.data.image_size, config.data.image_size)


def make_anchors(config: ml_collections.ConfigDict, canvas=None) -> np.ndarray:
  """[N, 4] (x1, y1, x2, y2) anchors of a padded canvas (the square bucket when None), a
  constant of the step compiled for that canvas."""
  return anchors_lib.generate_anchors(config.anchors, config.model.min_level,
                                      config.model.max_level,
                                      image_size(config) if canvas is None else tuple(canvas))


def normalize(batch: dict[str, jax.Array], config: ml_collections.ConfigDict) -> jax.Array:
  return preprocess.normalize_images(batch['image'], batch['image_hw'], config.data.pixel_mean,
                                     config.data.pixel_std)


def loss_and_grads(params, batch_stats, batch: dict[str, jax.Array], *, model,
                   config: ml_collections.ConfigDict,
                   loss_hparams: Mapping[str, jax.Array] | None = None):
  """The detection loss of `batch` and its gradient by `params` (the train step's own):
  -> ((loss, (parts, new batch_stats)), grads). The anchors are a trace-time constant of the
  batch's canvas (one compilation per canvas). loss_hparams: `losses.detection_loss`'s."""
  anchors = make_anchors(config, batch['image'].shape[1:3])
  images = normalize(batch, config)
  trains_bn = config.model.norm == 'bn'

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': batch_stats}
    if trains_bn:
      outputs, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
      new_stats = updates['batch_stats']
    else:
      outputs = model.apply(variables, images, train=True)
      new_stats = batch_stats
    loss, parts = losses.detection_loss(outputs, batch, jnp.asarray(anchors), config,
                                        loss_hparams)
    return loss, (parts, new_stats)

  return jax.value_and_grad(loss_fn, has_aux=True)(params)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model,
               config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
               hparams: Mapping[str, jax.Array] | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on the global batch. A non-finite loss or gradient leaves the state as it was
  and records the step in `first_bad_step`, and no step after it updates the state, so nothing
  bad is ever written to a checkpoint (a fused sweep's stopped member stays at its last good
  state while the others train on).

  hparams: traced numbers replacing config fields (losses.TRACED_FIELDS and
  optim.TRACED_FIELDS by their last names; `tx` built with the same ones), a fused-sweep
  member's under `jax.vmap`.
  """
  hparams = dict(hparams or {})
  loss_hparams = {k: v for k, v in hparams.items() if k in losses.TRACED_FIELDS}
  (loss, (parts, new_stats)), grads = loss_and_grads(state.params, state.batch_stats, batch,
                                                     model=model, config=config,
                                                     loss_hparams=loss_hparams)
  with jax.named_scope('optimizer'):
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    update = finite & (state.first_bad_step < 0)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(update, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        batch_stats=keep(new_stats, state.batch_stats),
        opt_state=keep(new_opt_state, state.opt_state),
        first_bad_step=jnp.where((state.first_bad_step < 0) & ~finite, state.step,
                                 state.first_bad_step))
  metrics = {'loss': loss, 'grad_norm': grad_norm,
             'learning_rate': optim.learning_rate_schedule(config, hparams)(state.step), **parts}
  return new_state, metrics


def init_variables(config: ml_collections.ConfigDict, model, rng: jax.Array,
                   pretrained: bool = True) -> dict[str, Any]:
  """Fresh variables, overwritten by `config.init_from` where given and `pretrained`."""
  variables = models.init_variables(model, rng, image_size(config))
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  if config.init_from and pretrained:
    variables = pretrained_lib.load(variables, config.init_from)
  return variables


def create_train_state(config, model, mesh, tx_fn=optim.make_optimizer, pretrained: bool = True
                       ) -> tuple[TrainState, Any]:
  """Initialises the replicated state directly on the mesh (no host copy of the parameters).

  pretrained=False skips `config.init_from`: a resumed run overwrites every array anyway.
  """
  # rbg keys: initialisation compiles faster with them than with threefry on CPU, and init
  # draws no key that training reuses.
  rng = jax.random.key(config.seed, impl='rbg')
  variables = init_variables(config, model, rng, pretrained)  # Jitted inside.
  tx = tx_fn(config, variables['params'])
  replicated = sharding_lib.replicated(mesh)

  @functools.partial(jax.jit, out_shardings=replicated)
  def make(variables):
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                      batch_stats=variables['batch_stats'],
                      opt_state=tx.init(variables['params']),
                      first_bad_step=jnp.full((), -1, jnp.int32))

  return make(variables), tx


def abstract_train_state(config, model, mesh) -> tuple[TrainState, Any]:
  """Shapes, dtypes and shardings of the train state without computing it (for AOT compiles)."""
  variables = jax.eval_shape(
      lambda rng: models.init_variables(model, rng, image_size(config)),
      jax.random.key(config.seed, impl='rbg'))
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  tx = optim.make_optimizer(config, variables['params'])
  state = jax.eval_shape(
      lambda v: TrainState(step=jnp.zeros((), jnp.int32), params=v['params'],
                           batch_stats=v['batch_stats'], opt_state=tx.init(v['params']),
                           first_bad_step=jnp.full((), -1, jnp.int32)), variables)
  replicated = sharding_lib.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                      state), tx


# The host-batch fields the train step reads; the rest (image ids, original sizes) stay on the
# host, so that an int64 image id is never truncated on its way to the devices.
TRAIN_INPUTS = ('image', 'image_hw', 'boxes', 'labels', 'is_crowd', 'box_valid')


def train_inputs(host_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: host_batch[k] for k in TRAIN_INPUTS}


def abstract_batch(config, mesh, canvas=None) -> dict[str, jax.ShapeDtypeStruct]:
  """The global training batch as abstract arrays split over 'data', padded to `canvas` (the
  square bucket when None)."""
  b, g = config.batch_size, config.data.max_boxes
  hc, wc = image_size(config) if canvas is None else canvas
  shapes = {'image': ((b, hc, wc, 3), resize.image_dtype(config.data)),
            'image_hw': ((b, 2), jnp.int32),
            'boxes': ((b, g, 4), jnp.float32), 'labels': ((b, g), jnp.int32),
            'is_crowd': ((b, g), jnp.bool_), 'box_valid': ((b, g), jnp.bool_)}
  sharding = sharding_lib.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
          for k, (shape, dtype) in shapes.items()}


def make_train_step(config, model, tx, mesh):
  """The jitted step with explicit shardings; the state is donated."""
  replicated = sharding_lib.replicated(mesh)
  step_fn = functools.partial(train_step, model=model, config=config, tx=tx)
  return jax.jit(step_fn, in_shardings=(replicated, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def validate_config(config: ml_collections.ConfigDict):
  sizes.check_canvases(config.data)
  if len(config.anchors.sizes) != config.model.max_level - config.model.min_level + 1:
    raise ValueError('config.anchors.sizes needs one base size per level '
                     f'P{config.model.min_level}..P{config.model.max_level}')
  if config.keep_best_by and config.keep_best_by not in coco_eval.METRIC_NAMES:
    raise ValueError(f'config.keep_best_by={config.keep_best_by!r} is not a COCO metric; one of '
                     f"{coco_eval.METRIC_NAMES}, or '' for none.")


def write_config(config: ml_collections.ConfigDict, workdir: str):
  if jax.process_index() == 0:
    fileio.Path(workdir).mkdir(parents=True, exist_ok=True)
    fileio.write_atomic(fileio.Path(workdir) / 'config.json', config.to_json_best_effort(indent=2))


def check_finite(state: TrainState, manager, workdir: str):
  """Raises NonFiniteError when `state` recorded a non-finite step (a host sync)."""
  bad = int(jax.device_get(state.first_bad_step))
  if bad >= 0:
    raise run_control.NonFiniteError(
        f'Non-finite loss or gradient at step {bad + 1}; stopped without saving. The last '
        f'good checkpoint is step {manager.latest_step()} in {workdir}.')


def evaluate_and_log(config, state: TrainState, step: int, *, workdir: str, mesh, logger,
                     best_manager, background: background_lib.BackgroundMetrics | None = None):
  """Evaluates `state` as the state of `step`, which is checkpointed already (the save completes
  before a failure here leaves train_and_evaluate), logs the numbers and keeps the best.

  With `background`, only the detector runs now (on the devices); the COCO metric is scored in
  a thread while training goes on and logged, at `step`, when `background` finishes it.

  Returns:
    The metrics (every host has them), or None with `background`.
  """
  config = sizes.with_eval_batch(config, sizes.eval_batch_size(
      config, mesh.shape[sharding_lib.DATA_AXIS], jax.process_count()))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  if background is None:
    try:
      eval_metrics = evaluator.evaluate_variables(config, variables, workdir, mesh=mesh)
    except Exception as e:  # pylint: disable=broad-except
      raise evaluation_error(config, workdir, step, e) from e
    log_evaluation(config, step, eval_metrics, variables, workdir=workdir, logger=logger,
                   best_manager=best_manager)
    return eval_metrics
  try:
    detections = evaluator.detect_split(config, variables, workdir, mesh)
  except Exception as e:  # pylint: disable=broad-except
    raise evaluation_error(config, workdir, step, e) from e
  # The state is donated to the next step: the best checkpoint needs a copy of these.
  kept = jax.tree.map(jnp.copy, variables) if best_manager is not None else None
  background.submit(step, detections, kept)
  return None


def evaluation_error(config, workdir: str, step: int, e: BaseException
                     ) -> run_control.EvaluationError:
  return run_control.EvaluationError(
      f'Evaluation of {config.data.eval_split!r} at step {step} failed '
      f'({type(e).__name__}: {e}). Training progress is kept: checkpoint step {step} is '
      f'saved in {workdir}; fix the cause and re-run the same command to resume (an '
      'unreadable image can be left out with config.data.skip_bad_images=True).')


def log_evaluation(config, step: int, eval_metrics: dict, variables, *, workdir: str, logger,
                   best_manager):
  """Logs the metrics of the evaluation at `step`, keeps `variables` (that step's
  {'params', 'batch_stats'}; None: not kept) as the best when they are, prints the table."""
  logger.write(step, {k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))},
               prefix='eval')
  if best_manager is not None and variables is not None and ckpt.save_if_best(
      best_manager, config.keep_best_by, eval_metrics[config.keep_best_by],
      types.SimpleNamespace(step=step, **variables)):
    logging.info('Best %s so far (%.4f) at step %d: kept in %s', config.keep_best_by,
                 eval_metrics[config.keep_best_by], step, ckpt.best_dir(workdir))
  if jax.process_index() == 0:
    print(f'Evaluation of {config.data.eval_split!r} at step {step} (written to {workdir}):\n'
          f'{coco_eval.format_table(eval_metrics)}', flush=True)


def background_metrics(config, workdir: str, logger, best_manager, resume_step: int
                       ) -> background_lib.BackgroundMetrics:
  """The run's metric thread, after redoing what a stopped run left unfinished (at or before
  `resume_step`) and the metrics log does not hold."""
  background = background_lib.BackgroundMetrics(
      workdir,
      functools.partial(log_evaluation, config, workdir=workdir, logger=logger,
                        best_manager=best_manager),
      functools.partial(evaluation_error, config, workdir))
  if resume_step <= 0:
    return background
  logged = {r['step'] for r in metrics_lib.read_records(workdir)
            if 'step' in r and any(k.startswith('eval/') for k in r)}

  def variables_of_step(step):
    if best_manager is None:
      return None
    try:
      return ckpt.restore_variables(workdir, step)[0]
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Checkpoint step %d is gone (%s): its redone metric is logged but not '
                      'compared for config.keep_best_by.', step, e)
      return None

  background.redo(resume_step, logged,
                  lambda split: pipeline.create_source(config.data, split).coco_gt(
                      config.data.max_eval_images),
                  variables_of_step)
  return background


def with_categories(config: ml_collections.ConfigDict, categories) -> ml_collections.ConfigDict:
  """A copy of `config` with the training split's categories, which evaluation, export and
  predict read from the saved config; says what to set when the config disagrees with them."""
  if categories.num_classes != config.model.num_classes:
    raise ValueError(
        f'The training split of {config.data.name!r} has {categories.num_classes} categories '
        f'but config.model.num_classes={config.model.num_classes}; set '
        f'--config.model.num_classes={categories.num_classes}')
  if config.categories and config.categories != categories.to_json():
    raise ValueError(f'config.categories differs from the categories of the training split of '
                     f'{config.data.name!r}; leave it empty to take the data\'s own.')
  config = ml_collections.ConfigDict(config.to_dict())
  config.categories = categories.to_json()
  return config


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (resuming from the newest checkpoint in `workdir`), evaluates, returns the state.

  Raises Preempted when a preemption request stopped it early (its checkpoint is saved).
  """
  validate_config(config)
  run_control.make_writable_workdir(workdir)
  sizes.check_here(config)
  mesh = sharding_lib.make_mesh(config)
  source = pipeline.create_source(config.data, config.data.train_split)
  config = with_categories(config, source.categories)

  model = models.create_model(config, mesh)
  manager = ckpt.make_manager(workdir, config.keep_checkpoints)
  best_manager = (ckpt.make_best_manager(workdir, config.keep_best_by) if config.keep_best_by
                  else None)
  # Resuming needs only the checkpoint (as detectron2's resume_or_load): the init_from file may
  # be gone, or its relative path be meant for another working directory, by then.
  state, tx = create_train_state(config, model, mesh,
                                 pretrained=manager.latest_step() is None)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored = ckpt.restore_latest(manager, abstract)
  if restored is not None:
    state = restored
    if int(state.first_bad_step) >= 0:
      raise run_control.NonFiniteError(f'the checkpoint in {workdir} recorded a non-finite step '
                                       f'{int(state.first_bad_step)}')
  # Only now: a command whose config does not fit the checkpoint must not overwrite the
  # config.json that evaluation and export read next to it.
  write_config(config, workdir)
  start_step = int(jax.device_get(state.step))
  total = config.num_train_steps
  logging.info('Starting at step %d of %d (%s)', start_step, total,
               'resumed' if restored is not None else 'fresh')
  step_fn = make_train_step(config, model, tx, mesh)
  loader = pipeline.TrainLoader(source, config.data, config.batch_size, config.seed,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
  logger = metrics_lib.MetricLogger(workdir, resume_step=start_step)
  preemption = run_control.Preemption()
  clock = run_control.StepClock(start_step)
  background = background_metrics(config, workdir, logger, best_manager, start_step)
  evaluate = functools.partial(evaluate_and_log, config, workdir=workdir, mesh=mesh,
                               logger=logger, best_manager=best_manager, background=background)
  pending: list[dict[str, jax.Array]] = []
  compiled = set()  # Canvases the train step has been compiled for.
  try:
    batches = loader.iterate(start_step)
    for step in range(start_step + 1, total + 1):
      host_batch = next(batches)
      canvas = host_batch['image'].shape[1:3]
      if canvas not in compiled:
        logging.info('Compiling the train step for %dx%d images.', *canvas)
      state, metrics = step_fn(state, sharding_lib.to_global(train_inputs(host_batch), mesh))
      pending.append(metrics)
      if canvas not in compiled:
        # The first step of each canvas includes compilation: the clock starts after it.
        compiled.add(canvas)
        jax.block_until_ready(metrics)
        clock.start(step)
      if preemption.reached(step):
        ckpt.save(manager, state, force=True)
        ckpt.wait_until_saved(manager)
        raise run_control.Preempted(step, workdir)
      if run_control.itstime(step, config.log_every_steps, total):
        check_finite(state, manager, workdir)
        summary = jax.tree.map(lambda *x: float(np.mean(x)), *jax.device_get(pending))
        pending = []
        per_step = clock.lap(step)
        eta = '?'
        if per_step is not None:
          summary['images_per_second'] = config.batch_size / per_step
          eta = run_control.format_eta(per_step * (total - step))
        logger.write(step, summary)
        background.poll()  # Logs a finished evaluation metric, at its own step.
        logging.info('step %d/%d  loss %.4f (cls %.4f box %.4f)  fg %.1f  lr %.3g  %.1f img/s  '
                     'ETA %s', step, total, summary['loss'], summary['cls_loss'],
                     summary['box_loss'], summary['num_foreground'], summary['learning_rate'],
                     summary.get('images_per_second', 0.0), eta)
      # An evaluation step is saved too, before evaluating: a failed evaluation loses nothing.
      if (run_control.itstime(step, config.checkpoint_every_steps, total)
          or run_control.itstime(step, config.eval_every_steps, total)):
        check_finite(state, manager, workdir)
        ckpt.save(manager, state)
      if run_control.itstime(step, config.eval_every_steps, total, last=False):
        evaluate(state, step)
        clock.start(step)
    # The final evaluation also runs when a finished run is started again (e.g. `make demo`),
    # labelled with the step it evaluates: a checkpoint past a lowered num_train_steps is newer.
    if start_step > total:
      logging.warning('The checkpoint in %s is at step %d, past num_train_steps=%d: evaluating '
                      'it as it is.', workdir, start_step, total)
    evaluate(state, max(start_step, total))
    background.wait()
  finally:
    ckpt.wait_until_saved(manager)
    logger.close()
  return state
