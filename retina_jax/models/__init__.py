"""RetinaNet in Flax: ResNet backbone, FPN, shared class/box heads."""

from retina_jax.models.retinanet import RetinaNet
from retina_jax.models.retinanet import create_model
from retina_jax.models.retinanet import frozen_mask
from retina_jax.models.retinanet import init_variables

__all__ = ['RetinaNet', 'create_model', 'frozen_mask', 'init_variables']
