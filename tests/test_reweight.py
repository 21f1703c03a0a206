"""RW-KD: the per-example mix by hand, the meta-gradient against finite differences of an
explicit look-ahead, the meta-learner's state in checkpoints, the ZeRO-3 and holdout
refusals, and real runs (exact resume; 2 ranks under ZeRO-2)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_same_run, run_dskd, write_config
from dskd.losses import build_loss_terms


def _rw(**spec):
    return build_loss_terms({"rw_kd": {"weight": 1.0, **spec}})["rw_kd"]


def test_weights_start_at_one_half_and_mix_ce_with_kd_per_example():
    term = _rw(temperature=2.0)
    zs = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]])
    zt = torch.tensor([[0.0, 1.0], [1.0, 3.0], [2.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    got = term({"logits": zs}, {"logits": zt, "labels": labels}, None)
    ce = F.cross_entropy(zs, labels, reduction="none")
    kd = torch.stack([4 * F.kl_div(F.log_softmax(zs[i] / 2, -1), F.softmax(zt[i] / 2, -1), reduction="sum")
                      for i in range(3)])
    assert got.item() == pytest.approx((0.5 * ce + 0.5 * kd).mean().item(), rel=1e-6)
    assert term.extra_logs()["weight_mean"].item() == 0.5
    # The meta-learner is not a parameter of the term: DeepSpeed's optimizer never sees it.
    assert list(term.parameters()) == []


class Tiny(nn.Module):
    """A student whose look-ahead is easy to write out by hand."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embedding = nn.Parameter(torch.randn(10, 4, generator=generator, dtype=torch.float64))
        self.head = nn.Parameter(torch.randn(4, 3, generator=generator, dtype=torch.float64))

    def forward(self, input_ids, attention_mask):
        return {"logits": self.logits(self.embedding, self.head, input_ids)}

    @staticmethod
    def logits(embedding, head, input_ids):
        return embedding[input_ids].mean(1) @ head


def test_meta_gradient_equals_finite_differences_of_the_look_ahead():
    term = _rw(temperature=2.0, hidden=3)
    with torch.no_grad():  # a meta-learner away from its zero start, so every weight has a gradient
        generator = torch.Generator().manual_seed(1)
        for p in term.learner.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    term.learner.double()
    object.__setattr__(term, "meta_optimizer", torch.optim.SGD(term.learner.parameters(), lr=1.0))
    student = Tiny()
    batch = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 5, 9]]),
             "attention_mask": torch.ones(4, 3, dtype=torch.long), "labels": torch.tensor([0, 1, 2, 1])}
    meta = {"input_ids": torch.tensor([[2, 4, 6], [3, 5, 7]]), "attention_mask": torch.ones(2, 3, dtype=torch.long),
            "labels": torch.tensor([2, 0])}
    teacher_logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.5], [0.0, 0.0, 3.0], [1.0, 1.0, 0.0]],
                                  dtype=torch.float64)
    eta = 0.7

    def meta_loss() -> float:
        """The look-ahead written out: SGD step on (embedding, head), then CE on the meta batch."""
        emb, head = (p.detach().clone().requires_grad_() for p in (student.embedding, student.head))
        zs = Tiny.logits(emb, head, batch["input_ids"])
        ce, kd, believed = term.per_example(zs, teacher_logits, batch["labels"])
        w = term.weights(ce, kd, believed)
        loss = (w * ce + (1 - w) * kd).mean()
        g_emb, g_head = torch.autograd.grad(loss, (emb, head))
        zm = Tiny.logits(emb - eta * g_emb, head - eta * g_head, meta["input_ids"])
        return F.cross_entropy(zm, meta["labels"]).item()

    before = [p.detach().clone() for p in term.learner.parameters()]
    numeric = []
    for p in term.learner.parameters():
        grad = torch.zeros_like(p)
        for i in range(p.numel()):
            flat = p.data.view(-1)
            keep = flat[i].item()
            flat[i] = keep + 1e-6
            up = meta_loss()
            flat[i] = keep - 1e-6
            down = meta_loss()
            flat[i] = keep
            grad.view(-1)[i] = (up - down) / 2e-6
        numeric.append(grad)
    expected = meta_loss()
    value = term.meta_update(student, batch, teacher_logits, meta, student_lr=eta)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    analytic = [b - p.detach() for b, p in zip(before, term.learner.parameters())]  # SGD, lr 1
    for a, n in zip(analytic, numeric):
        assert torch.allclose(a, n, atol=1e-7, rtol=1e-5), (a, n)
    assert any(a.abs().max() > 1e-4 for a in analytic)
    assert student.embedding.grad is None and student.head.grad is None  # the student's .grad is untouched


def test_meta_learner_and_its_optimizer_travel_in_the_state_dict():
    term = _rw(hidden=4, meta_lr=0.1)
    student = Tiny()
    batch = {"input_ids": torch.tensor([[1, 2], [3, 4]]), "attention_mask": torch.ones(2, 2, dtype=torch.long),
             "labels": torch.tensor([0, 2])}
    term.learner.double()
    term.meta_update(student, batch, torch.zeros(2, 3, dtype=torch.float64), batch, student_lr=0.5)
    state = term.state_dict()
    fresh = _rw(hidden=4, meta_lr=0.1)
    fresh.learner.double()
    fresh.load_state_dict(state)
    for a, b in zip(term.learner.parameters(), fresh.learner.parameters()):
        assert torch.equal(a, b)
    assert fresh.meta_optimizer.state_dict()["state"].keys() == term.meta_optimizer.state_dict()["state"].keys()


RW = {"losses": {"rw_kd": {"weight": 1.0, "temperature": 2.0, "meta_lr": 0.01}}, "data.holdout": 0.125,
      "training.save_every": 5}


def test_rw_kd_needs_held_out_examples_and_refuses_zero3(session_tmp):
    no_holdout = write_config(session_tmp / "rw-noholdout.yaml", dict(RW, **{"data.holdout": 0.0}))
    proc = run_dskd(["distill", "--config", no_holdout, "--output", session_tmp / "rw-x"], session_tmp)
    assert proc.returncode != 0 and "`losses.rw_kd` learns its weights on held-out training examples; set " \
                                   "`data.holdout`" in proc.stderr
    cfg = write_config(session_tmp / "rw.yaml", RW)
    proc = run_dskd(["distill", "--config", cfg, "--output", session_tmp / "rw-y", "--deepspeed",
                     "ds_configs/zero3_fp32.json"], session_tmp)
    assert proc.returncode != 0 and "ZeRO-3 partitions" in proc.stderr and "use ZeRO stage 0, 1 or 2" in proc.stderr
    assert not (session_tmp / "rw-x").exists() and not (session_tmp / "rw-y").exists()


@pytest.mark.slow
def test_rw_kd_resumes_exactly_and_runs_on_two_ranks_under_zero2(session_tmp):
    cfg = write_config(session_tmp / "rw.yaml", RW)
    full, split = session_tmp / "rw-full", session_tmp / "rw-split"
    assert run_dskd(["distill", "--config", cfg, "--output", full], session_tmp).returncode == 0
    assert run_dskd(["distill", "--config", cfg, "--output", split, "--set", "training.halt_after_steps=9"],
                    session_tmp).returncode == 0
    proc = run_dskd(["distill", "--config", cfg, "--output", split, "--resume"], session_tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(full, split)
    two = run_dskd(["distill", "--config", cfg, "--output", session_tmp / "rw-2r", "--deepspeed",
                    "ds_configs/zero2_fp32.json"], session_tmp, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "[data] 32 training examples held out (data.holdout 0.125)" in two.stderr
