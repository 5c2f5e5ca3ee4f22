"""Proxy-based losses: pytorch-metric-learning's, created by name with one common `scale` and `margin`.

How their proxies are updated (by gradient, or by momentum) is `training.proxies`'s concern."""

from __future__ import annotations

from pytorch_metric_learning import losses as pml_losses
from torch import nn

from momentum_proxy.errors import UserError
from momentum_proxy.training.config import LOSS_NAMES

LOSSES = {  # keyed by training.config.LOSS_NAMES (checked below), so options are validated without importing torch
    "proxy_nca": pml_losses.ProxyNCALoss,
    "normalized_softmax": pml_losses.NormalizedSoftmaxLoss,
    "cos_face": pml_losses.CosFaceLoss,
    "arc_face": pml_losses.ArcFaceLoss,
    "proxy_anchor": pml_losses.ProxyAnchorLoss,
}

assert tuple(LOSSES) == LOSS_NAMES

# How a common `scale` (inverse temperature of the logits) maps onto each loss's own parameter.
SCALE_PARAMS = {
    "proxy_nca": ("softmax_scale", lambda s: s),
    "normalized_softmax": ("temperature", lambda s: 1 / s),
    "cos_face": ("scale", lambda s: s),
    "arc_face": ("scale", lambda s: s),
    "proxy_anchor": ("alpha", lambda s: s),
}
HAS_MARGIN = ("cos_face", "arc_face", "proxy_anchor")


def create_loss(
    name: str, num_classes: int, embedding_size: int, scale: float | None = None, margin: float | None = None
) -> nn.Module:
    """A pytorch-metric-learning proxy loss by name. `scale`/`margin` override the library's defaults
    (ProxyNCA softmax_scale 1, NormalizedSoftmax 1/temperature 20, CosFace/ArcFace scale 64, ProxyAnchor alpha 32)."""
    if name not in LOSSES:
        raise UserError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    kwargs = {}
    if scale is not None:
        if scale <= 0:
            raise UserError(f"--loss-scale must be positive, got {scale}")
        param, convert = SCALE_PARAMS[name]
        kwargs[param] = convert(scale)
    if margin is not None:
        if name not in HAS_MARGIN:
            raise UserError(f"{name} has no margin; --margin applies to {', '.join(HAS_MARGIN)}")
        kwargs["margin"] = margin
    return LOSSES[name](num_classes=num_classes, embedding_size=embedding_size, **kwargs)
