import pytest
import torch

from momentum_proxy.errors import UserError
from momentum_proxy.training.losses import LOSSES, create_loss
from momentum_proxy.training.proxies import (
    MomentumProxyUpdate,
    init_proxies_from_class_means,
    proxies_by_class,
    proxy_parameter,
)


def reference_update(p, emb, labels, m, reduction):
    """The momentum rule written out class by class."""
    p = p.clone()
    for c in labels.unique():
        f = emb[labels == c]
        target = f.mean(0) if reduction == "mean" else f.sum(0)
        p[c] = (1 - m) * p[c] + m * target
    return p


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("m", [0.0, 0.3, 1.0])
def test_update_matches_formula_classes_by_dim(reduction, m):
    g = torch.Generator().manual_seed(0)
    p = torch.randn(6, 4, generator=g, dtype=torch.float64)
    emb = torch.randn(9, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 2, 2, 5, 0, 0, 2, 5, 1])
    expected = reference_update(p, emb, labels, m, reduction)
    out = MomentumProxyUpdate(m, reduction)(p.clone(), emb, labels)
    assert torch.equal(out[3], p[3]) and torch.equal(out[4], p[4])  # classes absent from the batch never move
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_update_transposed_layout_writes_in_place():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 5, generator=g)  # dim x classes, as NormalizedSoftmax/CosFace/ArcFace store W
    emb, labels = torch.randn(3, 4, generator=g), torch.tensor([1, 1, 4])
    expected = reference_update(w.t(), emb, labels, 0.5, "mean").t()
    w_ref = w
    MomentumProxyUpdate(0.5)(w, emb, labels, class_dim=1)
    assert w is w_ref
    torch.testing.assert_close(w, expected)


def test_mean_one_sample_equals_sum_and_class_seen_k_times_moves_once():
    p = torch.zeros(2, 2)
    emb = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 1])
    mean = MomentumProxyUpdate(0.5, "mean")(p.clone(), emb, labels)
    summed = MomentumProxyUpdate(0.5, "sum")(p.clone(), emb, labels)
    assert mean.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert summed.tolist() == [[2.0, 0.0], [0.0, 1.0]]


@pytest.mark.parametrize("name", list(LOSSES))
def test_update_loss_on_every_pml_loss(name):
    loss = create_loss(name, num_classes=5, embedding_size=3)
    before = proxies_by_class(loss).clone()
    emb, labels = torch.ones(2, 3), torch.tensor([2, 2])
    MomentumProxyUpdate(0.25).update_loss(loss, emb, labels)
    after = proxies_by_class(loss)
    torch.testing.assert_close(after[2], 0.75 * before[2] + 0.25)
    torch.testing.assert_close(after[[0, 1, 3, 4]], before[[0, 1, 3, 4]])
    param, class_dim = proxy_parameter(loss)
    assert param.shape[class_dim] == 5


def test_init_from_class_means():
    loss = create_loss("normalized_softmax", num_classes=3, embedding_size=2)
    init_proxies_from_class_means(loss, torch.tensor([[1.0, 1.0], [3.0, 1.0], [0.0, 4.0]]), torch.tensor([0, 0, 2]))
    assert proxies_by_class(loss)[0].tolist() == [2.0, 1.0]
    assert proxies_by_class(loss)[2].tolist() == [0.0, 4.0]


def test_bad_arguments():
    with pytest.raises(UserError):
        MomentumProxyUpdate(1.5)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):  # what a Python caller catches
        MomentumProxyUpdate(-0.1)
    with pytest.raises(UserError):
        MomentumProxyUpdate(0.5, "median")
    with pytest.raises(UserError, match="unknown loss"):
        create_loss("triplet", 3, 2)


def original_tool_update(proxies, emb, labels, m):
    """The original MP tool's three-line proxy update (index_select / index_copy_ / index_add_)."""
    kept = proxies.index_select(0, labels) * (1 - m)
    proxies.index_copy_(0, labels, kept)
    proxies.index_add_(0, labels, m * emb)
    return proxies


def test_sum_update_equals_the_original_tools_update_with_repeated_labels():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(5, 3, generator=g, dtype=torch.float64)
    emb = torch.randn(8, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, 1, 1, 4, 0, 4, 1, 0])  # repeated labels: the original adds m * f_i for each
    expected = original_tool_update(p.clone(), emb, labels, 0.4)
    torch.testing.assert_close(MomentumProxyUpdate(0.4, "sum")(p.clone(), emb, labels), expected, rtol=0, atol=1e-12)
    mean = MomentumProxyUpdate(0.4, "mean")(p.clone(), emb, labels)
    assert not torch.allclose(mean[1], expected[1])  # the default differs: one step of m per class


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_batch_is_skipped_and_counted_and_a_finite_one_still_updates(bad):
    """One non-finite embedding (an fp16 overflow) leaves every proxy as it was and counts one skipped update;
    the next finite batch moves the proxies exactly as the rule says."""
    loss = create_loss("proxy_anchor", num_classes=4, embedding_size=3)
    update = MomentumProxyUpdate(0.5).attach(loss)
    before = proxies_by_class(loss).clone()
    emb, labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]]), torch.tensor([0, 1, 1])
    poisoned = emb.clone()
    poisoned[2, 1] = bad
    update.step(poisoned, labels)
    assert torch.equal(proxies_by_class(loss), before) and update.skipped == 1
    update.step(emb, labels)
    torch.testing.assert_close(
        proxies_by_class(loss), reference_update(before, emb, labels, 0.5, "mean"), rtol=0, atol=0
    )
    assert update.skipped == 1
