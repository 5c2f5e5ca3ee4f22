"""The embedding network of the MP method: backbone -> global pooling -> LayerNorm -> bias-free Linear.

Images enter as uint8 (or float in [0, 1]) RGB tensors; `Preprocess` applies the backbone's own input convention.
"""

from __future__ import annotations

import torch
from torch import nn

from momentum_proxy.config import POOLINGS
from momentum_proxy.errors import UserError
from momentum_proxy.models.backbones import BackboneSpec, Weights, backbone_spec


class Preprocess(nn.Module):
    """uint8 (or [0, 1] float) RGB -> the backbone's input convention, channels-last."""

    def __init__(self, spec: BackboneSpec):
        super().__init__()
        self.bgr = spec.bgr
        self.scale = spec.input_scale
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * spec.input_scale, persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * spec.input_scale, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.bgr:
            x = x.flip(1)
        return ((x * self.scale - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


def global_pool(x: torch.Tensor, pooling: str) -> torch.Tensor:
    """Global pooling of feature maps (B, C, H, W) or tokens (B, N, C): max, or avg + max."""
    dims = (2, 3) if x.ndim == 4 else (1,)
    if pooling == "max":
        return x.amax(dim=dims)
    return x.amax(dim=dims) + x.mean(dim=dims)


class EmbeddingNet(nn.Module):
    """Backbone -> global pooling -> LayerNorm -> Linear(bias=False) to `feature_dim` (raw, not normalised)."""

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        feature_dim: int = 512,
        weights: Weights = "default",
        pooling: str = "max",
        freeze_bn: bool = True,
        image_size: int | None = None,
    ):
        """`image_size`: the input size a backbone that fixes it (a timm ViT) is built for (None: its native one);
        convolutional backbones take any size."""
        super().__init__()
        if pooling not in POOLINGS:
            raise UserError(f"unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")
        spec = backbone_spec(backbone, image_size)
        self.preprocess = Preprocess(spec)
        self.backbone = spec.build(weights)
        channels = self.backbone.num_features
        self.pooling = pooling
        self.freeze_bn = freeze_bn
        self.norm = nn.LayerNorm(channels)
        self.fc = nn.Linear(channels, feature_dim, bias=False)
        self.to(memory_format=torch.channels_last)  # faster convolutions on CPU (oneDNN) and CUDA (tensor cores)

    def train(self, mode: bool = True):
        """Train mode, except that the backbone's BatchNorm layers stay in eval mode when `freeze_bn`."""
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (before the head)."""
        return global_pool(self.backbone(self.preprocess(x)), self.pooling)

    def forward(self, x: torch.Tensor, freeze_backbone: bool = False) -> torch.Tensor:
        """Raw embeddings; with `freeze_backbone` no gradient flows into the backbone (warm-up epochs)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_backbone):
            pooled = self.pooled(x)
        return self.fc(self.norm(pooled))

    def head_parameters(self):
        return list(self.norm.parameters()) + list(self.fc.parameters())
