"""BN-Inception (Ioffe & Szegedy, 2015) exactly as ported by `pretrainedmodels`, without that unmaintained package.

Module names, their order and every layer's settings are the port's, so its published ImageNet weights file
(`bn_inception-52deb4733.pth`, through `published_weights`) loads by name; the classifier is left out (the module
maps images to 1024-channel feature maps). `tests/test_models.py` checks it against the port tensor for tensor and
output for output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Inception blocks: (input channels, 1x1, 3x3 reduce, 3x3, double-3x3 reduce, double 3x3, pool projection).
# 1x1 = 0 marks a reduction block (3c, 4e): stride-2 3x3s, a stride-2 max pool and no 1x1 or projection branch.
BLOCKS = {
    "3a": (192, 64, 64, 64, 64, 96, 32),
    "3b": (256, 64, 64, 96, 64, 96, 64),
    "3c": (320, 0, 128, 160, 64, 96, 0),
    "4a": (576, 224, 64, 96, 96, 128, 128),
    "4b": (576, 192, 96, 128, 96, 128, 128),
    "4c": (576, 160, 128, 160, 128, 160, 128),
    "4d": (608, 96, 128, 192, 160, 192, 128),
    "4e": (608, 0, 128, 192, 192, 256, 0),
    "5a": (1056, 352, 192, 320, 160, 224, 128),
    "5b": (1024, 352, 192, 320, 192, 224, 128),
}
LAST_BLOCK = "5b"  # its pool branch is a stride-1 max pool where the other full blocks average


class BNInception(nn.Module):
    """BGR images in 0-255 minus the mean (104, 117, 128) -> (N, 1024, H/32, W/32) feature maps."""

    num_features = 1024

    def __init__(self):
        super().__init__()
        self._unit("conv1_7x7_s2", 3, 64, 7, stride=2, padding=3)
        self._unit("conv2_3x3_reduce", 64, 64, 1)
        self._unit("conv2_3x3", 64, 192, 3, padding=1)
        for block, (cin, n1x1, r3x3, n3x3, rdouble, ndouble, nproj) in BLOCKS.items():
            p, stride = f"inception_{block}_", 1 if n1x1 else 2
            if n1x1:
                self._unit(p + "1x1", cin, n1x1, 1)
            self._unit(p + "3x3_reduce", cin, r3x3, 1)
            self._unit(p + "3x3", r3x3, n3x3, 3, stride=stride, padding=1)
            self._unit(p + "double_3x3_reduce", cin, rdouble, 1)
            self._unit(p + "double_3x3_1", rdouble, ndouble, 3, padding=1)
            self._unit(p + "double_3x3_2", ndouble, ndouble, 3, stride=stride, padding=1)
            if nproj:
                self._unit(p + "pool_proj", cin, nproj, 1)

    def _unit(self, name: str, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> None:
        self.add_module(name, nn.Conv2d(cin, cout, kernel, stride, padding))
        self.add_module(name + "_bn", nn.BatchNorm2d(cout))

    def _run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Convolution, batch norm, ReLU."""
        return F.relu(getattr(self, name + "_bn")(getattr(self, name)(x)), inplace=True)

    def _block(self, block: str, x: torch.Tensor) -> torch.Tensor:
        p, n1x1 = f"inception_{block}_", BLOCKS[block][1]
        out = [self._run(p + "1x1", x)] if n1x1 else []
        out.append(self._run(p + "3x3", self._run(p + "3x3_reduce", x)))
        out.append(self._run(p + "double_3x3_2", self._run(p + "double_3x3_1", self._run(p + "double_3x3_reduce", x))))
        if not n1x1:  # reduction block
            out.append(F.max_pool2d(x, 3, stride=2, ceil_mode=True))
        else:
            pool = F.max_pool2d if block == LAST_BLOCK else F.avg_pool2d
            out.append(self._run(p + "pool_proj", pool(x, 3, stride=1, padding=1, ceil_mode=True)))
        return torch.cat(out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self._run("conv1_7x7_s2", x), 3, stride=2, ceil_mode=True)
        x = F.max_pool2d(self._run("conv2_3x3", self._run("conv2_3x3_reduce", x)), 3, stride=2, ceil_mode=True)
        for block in BLOCKS:
            x = self._block(block, x)
        return x


def published_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published file's tensors in this module's shapes. Written by PyTorch 0.2, it stores batch-norm vectors
    as (1, C) and has no `num_batches_tracked` counters (zero here, as PyTorch fills them for old files)."""
    sd = {k: v.flatten() if "_bn." in k else v for k, v in state_dict.items()}
    for key in [k for k in sd if k.endswith("_bn.running_mean")]:
        sd.setdefault(key.replace("running_mean", "num_batches_tracked"), torch.tensor(0))
    return sd
