"""torchvision models as numerical references for the conversion and torchvision-exact tests."""

import numpy as np
import torch
import torchvision
from torchvision.models.detection import backbone_utils
from torchvision.ops import feature_pyramid_network, misc


def randomize_(model):
  """Non-default BN statistics and affine, biases and head weights, so that eps, the frozen-BN
  formula, a transposed kernel or a swapped bias all show; magnitudes stay O(1) through R50."""
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (torch.nn.BatchNorm2d, misc.FrozenBatchNorm2d)):
        c = module.weight.shape[0]
        module.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
        module.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
        module.weight.copy_(0.3 + 0.4 * torch.rand(c, generator=gen))
        module.bias.copy_(0.1 * torch.randn(c, generator=gen))
      elif isinstance(module, torch.nn.Conv2d):
        module.weight.mul_(1 + 0.1 * torch.randn(module.weight.shape, generator=gen))
        if module.bias is not None:
          module.bias.copy_(0.05 * torch.randn(module.bias.shape, generator=gen))
  return model.eval()


def numpy_state_dict(model, keep_num_batches_tracked=True):
  return {k: v.numpy() for k, v in model.state_dict().items()
          if keep_num_batches_tracked or not k.endswith('num_batches_tracked')}


def small_retinanet(min_size: int, max_size: int, channels: int = 64):
  """torchvision's RetinaNet v1 layout (91 classes, P6 from P5, frozen BN, stem and layer1
  frozen as with its default trainable_backbone_layers=3) on a ResNet-18 with `channels`-wide
  FPN and heads, and its GeneralizedRCNNTransform at min_size / max_size: a few hundred ms per
  forward on small images, where R50 at 800 px takes seconds."""
  torch.manual_seed(0)
  body = torchvision.models.resnet18(weights=None, norm_layer=misc.FrozenBatchNorm2d)
  for name, p in body.named_parameters():  # What _resnet_fpn_extractor(body, 3) trains.
    p.requires_grad_(name.startswith(('layer2', 'layer3', 'layer4')))
  backbone = backbone_utils.BackboneWithFPN(
      body, {'layer2': '0', 'layer3': '1', 'layer4': '2'}, [128, 256, 512], channels,
      extra_blocks=feature_pyramid_network.LastLevelP6P7(channels, channels))
  model = torchvision.models.detection.RetinaNet(backbone, num_classes=91, min_size=min_size,
                                                 max_size=max_size)
  with torch.no_grad():
    for name, p in model.head.named_parameters():
      if name.endswith('weight'):
        p.normal_(0.0, 0.03)  # Larger than the N(0, 0.01) init, so the outputs vary.
    # Scores around 0.1 instead of the prior's 0.01, so that many pass the 0.05 threshold.
    model.head.classification_head.cls_logits.bias.fill_(-2.2)
  return randomize_(model)
