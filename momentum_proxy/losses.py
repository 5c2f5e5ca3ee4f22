"""Proxy-based losses (pytorch-metric-learning's) and the momentum proxy update.

`MomentumProxyUpdate` is a small standalone piece: give it the proxy tensor, the batch's embeddings and labels,
and it moves every proxy of a class in the batch toward that class's embeddings,
    p_c <- (1 - m) * p_c + m * f_c,
with f_c the mean of the class's batch embeddings (`reduction="mean"`) or, as in the original MP tool, their
sum (`reduction="sum"`). It works with both proxy layouts of pytorch-metric-learning: classes x dim
(ProxyNCA, ProxyAnchor: `.proxies`) and dim x classes (NormalizedSoftmax, CosFace, ArcFace: `.W`).
"""
from __future__ import annotations

import torch
from pytorch_metric_learning import losses as pml_losses
from torch import nn

from momentum_proxy.config import LOSS_NAMES
from momentum_proxy.errors import UserError

LOSSES = {  # keyed by config.LOSS_NAMES (checked below), so options are validated without importing torch
    "proxy_nca": pml_losses.ProxyNCALoss,
    "normalized_softmax": pml_losses.NormalizedSoftmaxLoss,
    "cos_face": pml_losses.CosFaceLoss,
    "arc_face": pml_losses.ArcFaceLoss,
    "proxy_anchor": pml_losses.ProxyAnchorLoss,
}

assert tuple(LOSSES) == LOSS_NAMES

# How a common `scale` (inverse temperature of the logits) maps onto each loss's own parameter.
SCALE_PARAMS = {"proxy_nca": ("softmax_scale", lambda s: s), "normalized_softmax": ("temperature", lambda s: 1 / s),
                "cos_face": ("scale", lambda s: s), "arc_face": ("scale", lambda s: s),
                "proxy_anchor": ("alpha", lambda s: s)}
HAS_MARGIN = ("cos_face", "arc_face", "proxy_anchor")


def create_loss(name: str, num_classes: int, embedding_size: int, scale: float | None = None,
                margin: float | None = None) -> nn.Module:
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


def proxy_parameter(loss: nn.Module) -> tuple[nn.Parameter, int]:
    """The loss's proxy parameter and its class dimension (0: classes x dim, 1: dim x classes)."""
    if isinstance(getattr(loss, "proxies", None), nn.Parameter):
        return loss.proxies, 0
    if isinstance(getattr(loss, "W", None), nn.Parameter):
        return loss.W, 1
    raise UserError(f"{type(loss).__name__} has no proxies")


def proxies_by_class(loss: nn.Module) -> torch.Tensor:
    """A classes x dim view of the loss's proxies (writes through to the parameter)."""
    param, class_dim = proxy_parameter(loss)
    return param.data if class_dim == 0 else param.data.t()


class MomentumProxyUpdate:
    """Momentum update of class proxies from a batch: p_c <- (1 - m) p_c + m f_c for every class c in the batch.

    `reduction="mean"`: f_c is the mean of the batch embeddings of class c (each class moves by m, however often
    it appears). `reduction="sum"`: f_c is their sum, reproducing the original MP tool.
    """

    def __init__(self, momentum: float = 0.5, reduction: str = "mean"):
        if not 0.0 <= momentum <= 1.0:
            raise UserError(f"momentum must be in [0, 1], got {momentum}")
        if reduction not in ("mean", "sum"):
            raise UserError(f"unknown proxy update {reduction!r}; choose mean or sum")
        self.momentum = momentum
        self.reduction = reduction

    @torch.no_grad()
    def __call__(self, proxies: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor,
                 class_dim: int = 0) -> torch.Tensor:
        """Update `proxies` in place (classes along `class_dim`) and return it. No host synchronisation."""
        by_class = proxies if class_dim == 0 else proxies.t()
        emb = embeddings.detach().to(by_class.device, by_class.dtype)
        labels = labels.to(by_class.device)
        sums = torch.zeros_like(by_class).index_add_(0, labels, emb)
        counts = torch.zeros(len(by_class), 1, device=by_class.device, dtype=by_class.dtype)
        counts.index_add_(0, labels, torch.ones_like(emb[:, :1]))
        target = sums / counts.clamp(min=1) if self.reduction == "mean" else sums
        m = self.momentum
        by_class.copy_(torch.where(counts > 0, (1.0 - m) * by_class + m * target, by_class))
        return proxies

    def update_loss(self, loss: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Apply the update to a pytorch-metric-learning loss's proxies, whatever their layout."""
        param, class_dim = proxy_parameter(loss)
        self(param.data, embeddings, labels, class_dim)


@torch.no_grad()
def init_proxies_from_class_means(loss: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
    """Set every class's proxy to the mean of its embeddings (classes never seen keep their initial value)."""
    MomentumProxyUpdate(momentum=1.0).update_loss(loss, embeddings, labels)
