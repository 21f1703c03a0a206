import math

import pytest
import torch

from dskd.losses import LOSS_REGISTRY, HardLabelLoss, SoftLabelKD, build_loss_terms


def test_soft_kd_matches_hand_computation():
    zs = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]])
    zt = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    t = 2.0
    expected = 0.0
    for s_row, t_row in zip(zs.tolist(), zt.tolist(), strict=True):
        ps = [math.exp(v / t) for v in s_row]
        pt = [math.exp(v / t) for v in t_row]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        expected += sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps, strict=True))
    expected = expected / 2 * t * t  # batchmean, times T^2
    value = SoftLabelKD(temperature=t)({"logits": zs}, {"logits": zt}, mask=None)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_soft_kd_is_zero_for_identical_logits_and_mse_for_regression():
    z = torch.randn(4, 3)
    assert SoftLabelKD(3.0)({"logits": z}, {"logits": z.clone()}, None).item() == pytest.approx(0.0, abs=1e-6)
    zs, zt = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [1.0]])
    assert SoftLabelKD(3.0)({"logits": zs}, {"logits": zt}, None).item() == pytest.approx((1 + 4) / 2)


def test_soft_kd_gradient_matches_gradcheck():
    zs = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(3, 4, dtype=torch.float64)
    term = SoftLabelKD(temperature=1.5)
    # The term computes in float32 for bf16/fp16 inputs; check the formula in float64.
    term_fn = lambda s: torch.nn.functional.kl_div(  # noqa: E731
        torch.log_softmax(s / 1.5, -1), torch.log_softmax(zt / 1.5, -1), reduction="batchmean", log_target=True
    ) * 1.5**2
    assert torch.autograd.gradcheck(term_fn, (zs,))
    # And the module's gradient equals the float64 formula's.
    zs32 = zs.detach().float().requires_grad_(True)
    term({"logits": zs32}, {"logits": zt.float()}, None).backward()
    zs.grad = None
    term_fn(zs).backward()
    torch.testing.assert_close(zs32.grad.double(), zs.grad, rtol=1e-4, atol=1e-6)


def test_hard_ce_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (1 + math.e))) / 2
    value = HardLabelLoss()({"logits": logits}, {"labels": labels}, None)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    reg = HardLabelLoss()({"logits": torch.tensor([[1.0], [2.0]])}, {"labels": torch.tensor([0.0, 4.0])}, None)
    assert reg.item() == pytest.approx((1 + 4) / 2)


def test_registry_builds_terms_by_name_or_type():
    terms = build_loss_terms({"kd_hot": {"type": "soft_kd", "weight": 1.0, "temperature": 4.0}, "hard_ce": {"weight": 1}})
    assert isinstance(terms["kd_hot"], SoftLabelKD) and terms["kd_hot"].temperature == 4.0
    assert LOSS_REGISTRY["hard_ce"].uses_teacher is False and LOSS_REGISTRY["soft_kd"].needs == {"logits"}
