"""The momentum proxy update, the method's central idea, as one composable piece.

`MomentumProxyUpdate` moves every proxy of a class in the batch toward that class's batch embeddings,
    p_c <- (1 - m) * p_c + m * f_c,
with f_c the mean of the class's batch embeddings (`reduction="mean"`) or, as in the original MP tool, their
sum (`reduction="sum"`). Like a pytorch-metric-learning regulariser it attaches to any proxy loss of that
library, whatever its proxy layout: classes x dim (ProxyNCA, ProxyAnchor: `.proxies`) or dim x classes
(NormalizedSoftmax, CosFace, ArcFace: `.W`):

    loss_fn = losses.CosFaceLoss(num_classes=100, embedding_size=512)
    update = MomentumProxyUpdate(momentum=0.5).attach(loss_fn)   # proxies get no gradient from now on
    ...
    loss_fn(embeddings, labels).backward(); optimizer.step()       # optimizer over the model only
    update.step(embeddings, labels)                                # proxies move toward the batch
"""

from __future__ import annotations

import torch
from torch import nn

from momentum_proxy.errors import UserError


def proxy_parameter(loss: nn.Module) -> tuple[nn.Parameter, int]:
    """The loss's proxy parameter and its class dimension (0: classes x dim, 1: dim x classes)."""
    for name, class_dim in (("proxies", 0), ("W", 1)):
        param = getattr(loss, name, None)
        if isinstance(param, nn.Parameter):
            return param, class_dim
    raise UserError(f"{type(loss).__name__} has no proxies")


def proxies_by_class(loss: nn.Module) -> torch.Tensor:
    """A classes x dim view of the loss's proxies (writes through to the parameter)."""
    param, class_dim = proxy_parameter(loss)
    return param.data if class_dim == 0 else param.data.t()


class MomentumProxyUpdate:
    """Momentum update of class proxies from a batch: p_c <- (1 - m) p_c + m f_c for every class c in the batch.

    `reduction="mean"`: f_c is the mean of the batch embeddings of class c (each class moves by m, however often
    it appears). `reduction="sum"`: f_c is their sum, reproducing the original MP tool.

    A batch with a non-finite embedding (an fp16 overflow) leaves every proxy as it was, and is counted in
    `skipped`: one NaN would otherwise spoil its class's proxy for good.
    """

    def __init__(self, momentum: float = 0.5, reduction: str = "mean"):
        if not 0.0 <= momentum <= 1.0:
            raise UserError(f"momentum must be in [0, 1], got {momentum}")
        if reduction not in ("mean", "sum"):
            raise UserError(f"unknown proxy update {reduction!r}; choose mean or sum")
        self.momentum = momentum
        self.reduction = reduction
        self._skipped: torch.Tensor | int = 0  # kept on the device: counting costs no host synchronisation

    @property
    def skipped(self) -> int:
        """How many updates were skipped because the batch's embeddings were not finite."""
        return int(self._skipped)

    @torch.no_grad()
    def __call__(
        self, proxies: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor, class_dim: int = 0
    ) -> torch.Tensor:
        """Update `proxies` in place (classes along `class_dim`) and return it, unless `embeddings` hold a
        non-finite value (then counted in `skipped`). No host synchronisation."""
        by_class = proxies if class_dim == 0 else proxies.t()
        emb = embeddings.detach().to(by_class.device, by_class.dtype)
        finite = torch.isfinite(emb).all()
        self._skipped = self._skipped + (~finite).long()
        labels = labels.to(by_class.device)
        sums = torch.zeros_like(by_class).index_add_(0, labels, emb)
        counts = torch.zeros(len(by_class), 1, device=by_class.device, dtype=by_class.dtype)
        counts.index_add_(0, labels, torch.ones_like(emb[:, :1]))
        target = sums / counts.clamp(min=1) if self.reduction == "mean" else sums
        m = self.momentum
        by_class.copy_(torch.where((counts > 0) & finite, (1.0 - m) * by_class + m * target, by_class))
        return proxies

    def update_loss(self, loss: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Apply the update to a pytorch-metric-learning loss's proxies, whatever their layout."""
        param, class_dim = proxy_parameter(loss)
        self(param.data, embeddings, labels, class_dim)

    def attach(self, loss: nn.Module) -> MomentumProxyUpdate:
        """Take over `loss`'s proxies: they stop requiring gradients (keep them out of the optimizer), and
        `step(embeddings, labels)` updates them. Returns self."""
        param, _ = proxy_parameter(loss)
        param.requires_grad_(False)
        self.loss = loss
        return self

    def step(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """After an optimizer step: move the attached loss's proxies toward this batch's embeddings."""
        if getattr(self, "loss", None) is None:
            raise UserError("attach the update to a loss first: MomentumProxyUpdate(m).attach(loss)")
        self.update_loss(self.loss, embeddings, labels)


@torch.no_grad()
def init_proxies_from_class_means(loss: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
    """Set every class's proxy to the mean of its embeddings (classes never seen keep their initial value)."""
    MomentumProxyUpdate(momentum=1.0).update_loss(loss, embeddings, labels)
