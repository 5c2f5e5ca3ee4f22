import numpy as np
import pytest
import torch

from momentum_proxy.errors import UserError
from momentum_proxy.models import weights as W
from momentum_proxy.models.backbones import BACKBONES
from momentum_proxy.models.net import EmbeddingNet


def test_pretrained_lite0_recognises_a_real_photo():
    """The offline ImageNet weights land in our backbone: its features + the package's classifier say 'cat'."""
    from PIL import Image
    from skimage import data

    model = EmbeddingNet("efficientnet_lite0", 8).eval()
    image = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224)))
    x = torch.from_numpy(image).permute(2, 0, 1)[None]  # uint8, normalised (mean = std = 0.5) inside the model
    sd = W.load_state_dict_file(W.efficientnet_lite0_package_file())
    with torch.no_grad():
        pooled = model.backbone(model.preprocess(x)).mean(dim=(2, 3))
        logits = pooled @ sd["_fc.weight"].T + sd["_fc.bias"]
    assert logits.argmax().item() == 285  # ImageNet 285: Egyptian cat (Chelsea is a tabby-like cat)
    assert set(logits.topk(3).indices[0].tolist()) <= {281, 282, 285, 287}  # all cats


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
    return {k: v[None] if "_bn." in k else v for k, v in BNInception(num_classes=1000).state_dict().items()
            if not k.endswith("num_batches_tracked")}


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


@pytest.mark.parametrize("name,ckpt_key,backbone_key", [
    ("resnet50", "layer1.0.conv1.weight", "4.0.conv1.weight"),
    ("googlenet", "inception3a.branch1.conv.weight", "5.branch1.conv.weight"),
    ("inception", "inception_3a_1x1.weight", "model.inception_3a_1x1.weight"),
])
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
