"""Each loss against values computed by hand on 1 sample x 2 classes."""

import math

import pytest
import torch

from training.losses import (
    AsymmetricLoss,
    BCELoss,
    ClipContrastiveLoss,
    DistributionBalancedLoss,
    DualBranchLoss,
    available_losses,
    create_loss,
    effective_number_weights,
    prior_log_odds,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


LOGITS = torch.tensor([[2.0, 0.0]])
TARGETS = torch.tensor([[1.0, 0.0]])


def test_bce_by_hand():
    expected = (-math.log(sigmoid(2.0)) - math.log(1 - sigmoid(0.0))) / 2
    assert BCELoss()(LOGITS, TARGETS).item() == pytest.approx(expected, rel=1e-6)
    assert BCELoss(reduction="sum")(LOGITS, TARGETS).item() == pytest.approx(2 * expected, rel=1e-6)
    assert BCELoss(reduction="none")(LOGITS, TARGETS).shape == (1, 2)


def test_asl_by_hand():
    p_pos = sigmoid(2.0)
    loss_pos = -(1 - p_pos) ** 1 * math.log(p_pos)  # gamma_pos = 1
    p_neg = sigmoid(0.0) - 0.05  # probability shift on the negative
    loss_neg = -(p_neg**4) * math.log(1 - p_neg)  # gamma_neg = 4
    got = AsymmetricLoss()(LOGITS, TARGETS)
    assert got.item() == pytest.approx((loss_pos + loss_neg) / 2, rel=1e-6)


def test_asl_discards_easy_negatives_and_reduces_to_bce():
    easy_negative = AsymmetricLoss(reduction="none")(torch.tensor([[-5.0]]), torch.tensor([[0.0]]))
    assert easy_negative.item() == 0.0  # sigmoid(-5) = 0.0067 < clip 0.05
    plain = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)(LOGITS, TARGETS)
    assert plain.item() == pytest.approx(BCELoss()(LOGITS, TARGETS).item(), rel=1e-6)


def test_asl_finite_on_saturated_logits():
    loss = AsymmetricLoss()(torch.tensor([[-200.0, 200.0]]), torch.tensor([[1.0, 0.0]]))
    assert torch.isfinite(loss)


def test_effective_number_weights_by_hand():
    beta = 0.9999
    raw = [(1 - beta) / (1 - beta**n) for n in (100, 10)]
    expected = [w / (sum(raw) / 2) for w in raw]
    got = effective_number_weights([100, 10], beta)
    assert got.tolist() == pytest.approx(expected, rel=1e-9)
    assert got.mean() == pytest.approx(1.0) and got[1] > got[0]  # the rarer class weighs more


def test_db_loss_by_hand():
    counts, n_images, kappa, lam = [100, 10], 1000, 0.05, 2.0
    w = effective_number_weights(counts)
    prior = [math.log(100 / 900), math.log(10 / 990)]
    assert prior_log_odds(counts, n_images).tolist() == pytest.approx(prior)
    logits = torch.tensor([[1.0, -0.5]])
    s0, s1 = 1.0 + kappa * prior[0], -0.5 + kappa * prior[1]
    expected = (w[0] * softplus(-s0) + w[1] * softplus(lam * s1) / lam) / 2
    loss = DistributionBalancedLoss(counts, num_images=n_images, kappa=kappa, neg_scale=lam)
    assert loss(logits, TARGETS).item() == pytest.approx(expected, rel=1e-5)

    margin = 0.3  # positives must clear the margin: only the positive term changes
    expected_m = (w[0] * softplus(-(s0 - margin)) + w[1] * softplus(lam * s1) / lam) / 2
    loss_m = DistributionBalancedLoss(counts, num_images=n_images, margin=margin)
    assert loss_m(logits, TARGETS).item() == pytest.approx(expected_m, rel=1e-5)


def test_db_loss_needs_num_images():
    with pytest.raises(ValueError, match="num_images"):
        DistributionBalancedLoss([10, 20])


def test_clip_loss_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # normalised inside: [1, 0], [.707, .707]
    scale = 10.0
    c = 1 / math.sqrt(2)
    logits = [[scale * 1.0, scale * c], [0.0, scale * c]]  # rows: images, columns: texts

    def ce(row, target):
        return -row[target] + math.log(sum(math.exp(v) for v in row))

    columns = [[logits[0][j], logits[1][j]] for j in range(2)]
    expected = 0.5 * ((ce(logits[0], 0) + ce(logits[1], 1)) / 2 + (ce(columns[0], 0) + ce(columns[1], 1)) / 2)
    explicit = ClipContrastiveLoss()(image, text, logit_scale=scale)
    assert explicit.item() == pytest.approx(expected, rel=1e-5)
    learnable = ClipContrastiveLoss(init_scale=scale)
    value = learnable(image, text)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert learnable.log_scale.grad is not None


def test_clip_loss_default_scale_and_shape_check():
    assert ClipContrastiveLoss().log_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with pytest.raises(ValueError, match="pair row by row"):
        ClipContrastiveLoss()(torch.zeros(2, 4), torch.zeros(3, 4))


def test_dual_branch_is_contrastive_plus_alpha_asl():
    torch.manual_seed(0)
    image, text = torch.randn(4, 8), torch.randn(4, 8)
    logits, targets = torch.randn(4, 3), (torch.rand(4, 3) > 0.5).float()
    dual = DualBranchLoss()
    total, parts = dual(image, text, logits, targets, return_parts=True)
    con = ClipContrastiveLoss()(image, text)
    asl = AsymmetricLoss()(logits, targets)
    assert parts["contrastive"].item() == pytest.approx(con.item(), rel=1e-6)
    assert parts["asl"].item() == pytest.approx(asl.item(), rel=1e-6)
    assert total.item() == pytest.approx(con.item() + 1.5 * asl.item(), rel=1e-6)


def test_create_loss_registry():
    assert {"asl", "bce", "clip", "db", "dual"} <= set(available_losses())
    assert isinstance(create_loss("ASL", gamma_neg=2), AsymmetricLoss)
    assert isinstance(create_loss("db", class_counts=[5, 50], num_images=100), DistributionBalancedLoss)
    with pytest.raises(ValueError, match="choose from"):
        create_loss("focal-ish")
    with pytest.raises(ValueError, match="reduction"):
        create_loss("bce", reduction="avg")
