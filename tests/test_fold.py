"""Folding BatchNorm into convolutions for inference (models.fold, used by embedding.inference.load_model)."""

import copy

import pytest
import torch
from conftest import make_run
from timm.layers import BatchNormAct2d
from torch import nn

from momentum_proxy.embedding.inference import load_model
from momentum_proxy.models.backbones import BACKBONES
from momentum_proxy.models.fold import conv_bn_pairs, fold_batchnorm
from momentum_proxy.models.net import EmbeddingNet
from momentum_proxy.runs import RunDir


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from their initial 0/1, so that a fold is not trivial."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model


class Mixed(nn.Module):
    """conv -> BatchNorm2d -> ReLU; conv -> timm BatchNormAct2d; a conv whose output also feeds a second
    module (kept); a BatchNorm after a pooling layer (kept)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), BatchNormAct2d(8, act_layer=nn.ReLU6)
        self.c3, self.b3, self.side = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Identity()
        self.pool, self.b4 = nn.AvgPool2d(2), nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        y = self.c3(x)
        return self.b4(self.pool(self.b3(y) + self.side(y)))


def test_folds_exactly_the_conv_batchnorm_pairs_and_keeps_the_outputs():
    model = randomise_norms(Mixed()).eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16)
    pairs, output = conv_bn_pairs(model, x)
    assert pairs == [("c1", "b1"), ("c2", "b2")] and torch.equal(output, original(x))
    assert fold_batchnorm(model, x) == 2
    assert isinstance(model.b1, nn.Identity) and isinstance(model.b2[1], nn.ReLU6)
    assert isinstance(model.b3, nn.BatchNorm2d) and isinstance(model.b4, nn.BatchNorm2d)
    with torch.no_grad():
        other = torch.randn(3, 3, 20, 20)  # another batch and size than the example
        torch.testing.assert_close(model(other), original(other), atol=1e-5, rtol=1e-5)


def test_a_model_in_train_mode_is_refused():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(Mixed().train(), torch.randn(1, 3, 8, 8))


class HiddenUse(nn.Module):
    """The convolution's output enters the BatchNorm and, outside any module, the sum: folding would change it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_fold_that_would_change_the_outputs_is_undone():
    model = randomise_norms(HiddenUse()).eval()
    conv, bn, x = model.conv, model.bn, torch.randn(2, 3, 8, 8)
    before = model(x)
    assert conv_bn_pairs(model, x)[0] == [("conv", "bn")]  # the hooks cannot see the functional use...
    assert fold_batchnorm(model, x) == 0  # ...the output check can: every module is back
    assert model.conv is conv and model.bn is bn and torch.equal(model(x), before)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50", "googlenet"])
def test_every_batchnorm_of_a_convolutional_backbone_folds(name):
    assert name in BACKBONES
    model = randomise_norms(EmbeddingNet(name, feature_dim=16, weights=None)).eval()
    original = copy.deepcopy(model)
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    before = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert before > 0 and fold_batchnorm(model, x[:1]) == before
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), atol=1e-4, rtol=1e-4)


def test_load_model_gives_the_folded_model_with_the_checkpoints_embeddings(tiny_data, tmp_path):
    run = make_run(tmp_path / "run", tiny_data)
    model, cfg, _ = load_model(run, "cpu")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) and not model.training
    reference = EmbeddingNet(cfg.backbone, cfg.feature_dim, weights=None, pooling=cfg.pooling)
    reference.load_state_dict(RunDir(run).load_checkpoint()["model"])
    x = torch.randint(0, 256, (4, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.eval()(x), atol=1e-5, rtol=1e-5)


def test_a_model_without_batchnorm_is_not_even_run():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    assert fold_batchnorm(model, torch.randn(1, 3, 8, 8)) == 0 and calls == []


def test_load_model_can_leave_the_model_unfolded(tiny_data, tmp_path):
    run = make_run(tmp_path / "run", tiny_data)
    model, _, _ = load_model(run, "cpu", fold=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) and not model.training
