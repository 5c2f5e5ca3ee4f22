"""Test-time augmentation (`--tta`, `config.TTAS`): an image's embedding averaged over transformed copies of it.

`flip`: the mean of the L2-normalised embeddings of the image and of its mirror image (left-right), renormalised;
both go through the model in one batch of 2N, so it costs about twice the embedding time. The same function runs
in PyTorch (`inference.TorchEmbedder`, model processes) and inside exported graphs (`deploy.export.ExportNet`),
so every runtime embeds alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tta_embed(net, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """L2-normalised float32 embeddings of a uint8 NCHW batch by `net` (a module giving raw embeddings) with `tta`."""
    if tta == "none":
        return F.normalize(net(images).float(), dim=1)
    both = F.normalize(net(torch.cat([images, images.flip(3)])).float(), dim=1)
    return F.normalize(both.reshape(2, -1, both.shape[1]).sum(0), dim=1)  # (no batch size: traced graphs keep it free)
