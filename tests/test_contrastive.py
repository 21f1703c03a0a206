"""CoDIR: the contrastive loss by hand, negatives, the memory bank across ranks, resume."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import run_dskd, write_config
from dskd.methods.codir import CoDIR, sample_label_negatives, sample_random_negatives
from dskd.errors import DskdError
from dskd.losses import LayerGeometry


def _term(form="nce", k=2, n=6, labels=(0, 1, 0, 1, 0, 1), negatives="label", **kw):
    term = CoDIR(form=form, k=k, dim=3, negatives=negatives, **kw)
    term.bind(LayerGeometry(((1, 1),), 3, 3, 1, 1), "losses.codir")
    term.bind_data(torch.tensor(labels[:n]), torch.arange(n), False, seed=0)
    with torch.no_grad():  # identity heads: z = normalize(feature)
        for head in (term.embed_s, term.embed_t):
            head.weight.copy_(torch.eye(3))
            head.bias.zero_()
    return term


def _unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


FS = [[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]]  # student features of examples 0 and 1
FT = [[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
NEG = torch.tensor([[1, 3], [2, 4]])  # fixed negatives (labels differ from the anchors')


def _run(term, monkeypatch):
    monkeypatch.setattr(term, "_sample", lambda idx, labels: NEG)
    student = {"pairs": ((1, 1),), "cls": [torch.tensor(FS)]}
    teacher = {"cls": [torch.tensor(FT)], "idx": torch.tensor([0, 1]), "labels": torch.tensor([0, 1])}
    return term(student, teacher, torch.ones(2, 4))


def test_nce_form_against_a_hand_computation(monkeypatch):
    term = _term("nce")
    mem_s, mem_t = term.memory_s.tolist(), term.memory_t.tolist()
    loss = _run(term, monkeypatch)
    tau, n, k = 0.07, 6, 2
    zs, zt = [_unit(v) for v in FS], [_unit(v) for v in FT]

    def side(anchors, bank):
        cands = [[0, 1, 3], [1, 2, 4]]
        exps = [[math.exp(_dot(anchors[b], bank[j]) / tau) for j in cands[b]] for b in range(2)]
        z = sum(sum(row) for row in exps) / 6 * n  # first batch: mean exp-score x N
        total = 0.0
        for row in exps:
            p = [e / z for e in row]
            total += -(math.log(p[0] / (p[0] + k / n)) + sum(math.log((k / n) / (q + k / n)) for q in p[1:]))
        return total / 2, z

    loss_t, z_t = side(zt, mem_s)
    loss_s, z_s = side(zs, mem_t)
    assert loss.item() == pytest.approx((loss_t + loss_s) / 2, rel=1e-5)
    assert float(term.z_t) == pytest.approx(z_t, rel=1e-6) and float(term.z_s) == pytest.approx(z_s, rel=1e-6)
    # The bank moved towards the batch's embeddings: normalize(0.5 m + 0.5 z).
    expected = _unit([0.5 * a + 0.5 * b for a, b in zip(mem_s[1], zs[1])])
    assert term.memory_s[1].tolist() == pytest.approx(expected, rel=1e-5)
    assert term.memory_s[2].tolist() == pytest.approx(mem_s[2])  # untouched
    assert int(term.step) == 1


@pytest.mark.parametrize("symmetric", [True, False])
def test_infonce_form_against_a_hand_computation(monkeypatch, symmetric):
    term = _term("infonce", symmetric=symmetric)
    mem_s, mem_t = term.memory_s.tolist(), term.memory_t.tolist()
    loss = _run(term, monkeypatch)
    tau = 0.07
    zs, zt = [_unit(v) for v in FS], [_unit(v) for v in FT]

    def side(anchors, positives, bank):
        total = 0.0
        for b, negs in enumerate([[1, 3], [2, 4]]):
            logits = [_dot(anchors[b], positives[b]) / tau] + [_dot(anchors[b], bank[j]) / tau for j in negs]
            total += -(logits[0] - math.log(sum(math.exp(x) for x in logits)))
        return total / 2

    expected = side(zt, zs, mem_s)
    if symmetric:
        expected = (expected + side(zs, zt, mem_t)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_the_loss_trains_the_student_and_both_heads(monkeypatch):
    term = _term("infonce")
    monkeypatch.setattr(term, "_sample", lambda idx, labels: NEG)
    fs = torch.tensor(FS, requires_grad=True)
    student = {"pairs": ((1, 1),), "cls": [fs]}
    teacher = {"cls": [torch.tensor(FT)], "idx": torch.tensor([0, 1]), "labels": torch.tensor([0, 1])}
    term(student, teacher, torch.ones(2, 4)).backward()
    assert fs.grad.abs().sum() > 0 and term.embed_t.weight.grad.abs().sum() > 0 and term.embed_s.weight.grad is not None


def test_label_negatives_never_share_the_anchor_label_and_do_not_repeat():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0] * 3)
    pools = {c: (labels != c).nonzero().flatten() for c in range(3)}
    g = torch.Generator().manual_seed(0)
    anchors = torch.tensor([0, 1, 2, 2, 1, 0])
    for _ in range(50):
        neg = sample_label_negatives(anchors, pools, 10, g)
        assert (labels[neg] != anchors[:, None]).all()
        assert all(len(set(row.tolist())) == 10 for row in neg)  # without replacement while the pool allows


def test_random_negatives_never_pick_the_anchor():
    g = torch.Generator().manual_seed(0)
    anchors = torch.arange(5)
    neg = sample_random_negatives(anchors, 5, 200, g)
    assert (neg != anchors[:, None]).all() and neg.min() >= 0 and neg.max() <= 4


def test_duplicate_indices_in_one_update_keep_the_last_deterministically():
    term = _term("infonce", momentum=0.0)
    zs = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    term._update(torch.tensor([3, 5, 3]), zs, zs)
    assert term.memory_s[3].tolist() == [0.0, 0.0, 1.0] and term.memory_s[5].tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("kwargs, labels, regression, message", [
    ({"k": 4}, (0, 1, 0, 1, 0, 1), False, r"`losses.codir.k` is 4, more than the 3 training examples"),
    ({}, (0, 1, 0, 1, 0, 1), True, r"`losses.codir.negatives: label` needs class labels.*set `negatives: random`"),
    ({}, (1, 1, 1, 1, 1, 1), False, r"every training example has the same label"),
    ({"negatives": "random", "k": 6}, (0, 1, 0, 1, 0, 1), True, r"`losses.codir.k` is 6, but the training set has only 5"),
])
def test_bad_setups_fail_with_the_key_and_the_fix(kwargs, labels, regression, message):
    term = CoDIR(dim=3, **{"k": 2, **kwargs})
    term.bind(LayerGeometry(((1, 1),), 3, 3, 1, 1), "losses.codir")
    with pytest.raises(DskdError, match=message):
        term.bind_data(torch.tensor(labels), torch.arange(6), regression, seed=0)


def test_an_index_outside_the_bank_is_refused(monkeypatch):
    term = _term("infonce")
    student = {"pairs": ((1, 1),), "cls": [torch.tensor(FS)]}
    teacher = {"cls": [torch.tensor(FT)], "idx": torch.tensor([0, 9]), "labels": torch.tensor([0, 1])}
    with pytest.raises(DskdError, match=r"dataset index 9, outside the memory bank \(0..5\)"):
        term(student, teacher, torch.ones(2, 4))
    with pytest.raises(DskdError, match="are not 0..N-1"):
        _bad = CoDIR(dim=3)
        _bad.bind(LayerGeometry(((1, 1),), 3, 3, 1, 1), "losses.codir")
        _bad.bind_data(torch.tensor([0, 1, 0]), torch.tensor([0, 2, 5]), False, 0)


# ------------------------------------------------------------------ two ranks


def _two_rank_worker(rank, path, result_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different student features per rank
    term = _term("nce", k=2, n=6)
    for step in range(4):
        idx = torch.tensor([(2 * step + rank) % 6, (2 * step + rank + 3) % 6])
        student = {"pairs": ((1, 1),), "cls": [torch.randn(2, 3)]}
        teacher = {"cls": [torch.randn(2, 3)], "idx": idx, "labels": idx % 2}
        term(student, teacher, torch.ones(2, 4))
    torch.save({k: v for k, v in term.state_dict().items()}, os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_the_bank_stays_identical_on_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in ("memory_s", "memory_t", "z_s", "z_t", "step"):
        assert torch.equal(a[name], b[name]), name
    assert int(a["step"]) == 4
    fresh = _term("nce", k=2, n=6)
    assert not torch.equal(a["memory_s"], fresh.memory_s)  # it did move
    assert not torch.equal(a["embed_s.weight"], torch.zeros(1))


# ------------------------------------------------------------------ end to end


CODIR = {
    "teacher.arch": {"layers": 4, "hidden": 32, "heads": 4, "intermediate": 64},
    "student.layers": 2,
    "losses": {"hard_ce": {"weight": 0.5}, "soft_kd": {"weight": 0.5, "temperature": 2.0},
               "codir": {"weight": 0.1, "k": 16, "pool": "mean"}},
    "training.save_every": 4,
    "training.deepspeed": "ds_configs/zero1_fp32.json",
}


@pytest.mark.slow
def test_codir_resumes_exactly_bank_included(session_tmp):
    cfg = write_config(session_tmp / "codir.yaml", CODIR)
    full, split = session_tmp / "codir-full", session_tmp / "codir-split"
    assert run_dskd(["distill", "--config", cfg, "--output", full], session_tmp).returncode == 0
    assert run_dskd(["distill", "--config", cfg, "--output", split, "--set", "training.halt_after_steps=10"],
                    session_tmp).returncode == 0
    proc = run_dskd(["distill", "--config", cfg, "--output", split, "--resume"], session_tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from dskd.training.checkpoint import latest_tag

    states = []
    for run in (full, split):
        tag = latest_tag(run / "checkpoints")
        states.append(torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"])
    for name in ("memory_s", "memory_t", "z_s", "z_t", "step", "embed_t.weight"):
        key = f"terms.codir.{name}"
        assert torch.equal(states[0][key], states[1][key]), key
    assert int(states[0]["terms.codir.step"]) == 32  # 2 epochs x 16 micro-steps
    assert json.loads((full / "metrics.json").read_text()) == json.loads((split / "metrics.json").read_text())


@pytest.mark.slow
def test_codir_runs_on_two_ranks_and_refuses_partial_layer_stages(session_tmp):
    cfg = write_config(session_tmp / "codir2.yaml", {**CODIR, "training.epochs": 1})
    proc = run_dskd(["distill", "--config", cfg, "--output", session_tmp / "codir-2r"], session_tmp, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = write_config(session_tmp / "codir-bad.yaml", {
        **CODIR, "schedule": [{"name": "pid", "epochs": 1, "per_layer": "progressive"}]})
    proc = run_dskd(["distill", "--config", bad, "--output", session_tmp / "codir-bad"], session_tmp)
    assert proc.returncode == 2 and "but `losses.codir` compares all of them at once" in proc.stderr


def test_the_cache_and_the_plan_know_what_codir_reads():
    from dskd.losses import spec_for
    from dskd.commands.plan import memory_bank_bytes

    spec = spec_for({"codir": {"weight": 1.0, "pool": "mean"}, "soft_kd": {"weight": 1.0}}, ((1, 2), (2, 4)))
    assert spec.fields == ("logits", "mean") and spec.layers == (2, 4)
    assert spec.files() == ["logits", "mean_L2", "mean_L4"]
    # MNLI-size banks: 392,702 x 128, two of them.
    assert memory_bank_bytes({"codir": {"weight": 1.0}}, 392_702) == 2 * 392_702 * 128 * 4
    assert memory_bank_bytes({"codir": {"weight": 1.0, "bank_dtype": "bfloat16"}}, 392_702) == 2 * 392_702 * 128 * 2


def test_dev_batches_are_scored_without_touching_the_bank(monkeypatch):
    term = _term("nce")
    banks = term.memory_s.clone(), term.memory_t.clone()
    student = {"pairs": ((1, 1),), "cls": [torch.tensor(FS)]}
    teacher = {"cls": [torch.tensor(FT)], "idx": torch.tensor([40, 41]), "labels": torch.tensor([0, 1]),
               "split": "dev"}
    first = term(student, teacher, torch.ones(2, 4))  # dev indices need not be in the (training) bank
    assert torch.isfinite(first) and torch.equal(term(student, teacher, torch.ones(2, 4)), first)
    assert torch.equal(term.memory_s, banks[0]) and torch.equal(term.memory_t, banks[1]) and int(term.step) == 0
