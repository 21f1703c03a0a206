"""Baselines (PKD, TinyBERT, MiniLM): each term by hand, layer selection, 2-rank runs and exact resumes."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_same_run, run_dskd, write_config
from dskd.errors import DskdError
from dskd.losses import LayerGeometry, build_loss_terms


def _normalise(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def test_pkd_term_against_a_hand_computation():
    terms = build_loss_terms({"pkd": {"weight": 1.0}}, LayerGeometry(((1, 2), (2, 4), (3, 6)), 3, 3, 1, 1))
    pkd = terms["pkd"]
    assert [pkd.compares(p) for p in ((1, 2), (2, 4), (3, 6))] == [True, True, False]  # top layer: soft KD's
    hs = [[[1.0, 2.0, 2.0], [0.0, 3.0, 4.0]], [[1.0, 0.0, 0.0], [2.0, 2.0, 1.0]]]
    ht = [[[2.0, 1.0, 2.0], [0.0, 4.0, 3.0]], [[0.0, 1.0, 0.0], [1.0, 2.0, 2.0]]]
    student = {"pairs": ((1, 2), (2, 4)), "cls": [torch.tensor(h) for h in hs]}
    teacher = {"cls": [torch.tensor(h) for h in ht]}
    got = pkd.pair_losses(student, teacher, torch.ones(2, 3))
    for layer in range(2):
        pairs = zip(hs[layer], ht[layer])
        want = sum(sum((a - b) ** 2 for a, b in zip(_normalise(s), _normalise(t))) for s, t in pairs) / 6
        assert got[layer].item() == pytest.approx(want, rel=1e-6)


def test_pkd_logs_only_the_layers_it_compares():
    from test_internal import _tiny_bert

    from dskd.training.module import DistillationModule

    teacher, student = _tiny_bert(4, 16, 4, 0), _tiny_bert(2, 16, 4, 1)
    pairs = ((1, 2), (2, 4))
    terms = build_loss_terms({"pkd": {"weight": 1.0}}, LayerGeometry(pairs, 16, 16, 4, 4))
    module = DistillationModule(student, terms, frozenset({"logits", "cls"}))
    batch = {"input_ids": torch.randint(1, 60, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long),
             "labels": torch.tensor([0, 1])}
    from dskd.models import teacher_outputs

    total, values = module(batch, teacher_outputs(teacher, batch, module.needs, None, [2, 4]), {"pkd": 1.0}, pairs)
    assert set(values) == {"pkd", "pkd/L1"} and total.item() == pytest.approx(values["pkd/L1"].item())
    _, values = module(batch, teacher_outputs(teacher, batch, module.needs, None, [4]), {"pkd": 1.0}, ((2, 4),))
    assert values == {"pkd": values["pkd"]} and values["pkd"].item() == 0.0  # a stage of only the top layer


def test_pkd_needs_two_mapped_layers_to_leave_the_top_one_out():
    with pytest.raises(DskdError, match="`losses.pkd` with `exclude_last: true` needs at least 2 mapped layers"):
        build_loss_terms({"pkd": {"weight": 1.0}}, LayerGeometry(((1, 2),), 8, 8, 1, 1))


PKD = {
    "teacher.arch": {"layers": 4, "hidden": 32, "heads": 4, "intermediate": 64},
    "student.layers": 2,
    "losses": {"hard_ce": {"weight": 0.5}, "soft_kd": {"weight": 0.5, "temperature": 5.0},
               "pkd": {"weight": 100.0}},
    "training.save_every": 5,
    "training.deepspeed": "ds_configs/zero1_fp32.json",
}


@pytest.mark.slow
def test_pkd_runs_on_two_ranks_and_resumes_exactly(session_tmp):
    cfg = write_config(session_tmp / "pkd.yaml", PKD)
    two = run_dskd(["distill", "--config", cfg, "--output", session_tmp / "pkd-2r", "--set", "training.epochs=1"],
                   session_tmp, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    full, split = session_tmp / "pkd-full", session_tmp / "pkd-split"
    assert run_dskd(["distill", "--config", cfg, "--output", full], session_tmp).returncode == 0
    assert run_dskd(["distill", "--config", cfg, "--output", split, "--set", "training.halt_after_steps=11"],
                    session_tmp).returncode == 0
    proc = run_dskd(["distill", "--config", cfg, "--output", split, "--resume"], session_tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(full, split)


# ------------------------------------------------------------------------- TinyBERT

# Example 0: 3 real tokens then 1 pad; example 1: 2 real tokens.
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _hand_scores(q, k, mask, group):
    """Scores q.k/sqrt(d) entry by entry, heads averaged in groups, masked entries 0."""
    b_size, heads, s_len, d = q.shape
    out = []
    for b in range(b_size):
        per_head = [[[float(q[b, h, i] @ k[b, h, j]) / math.sqrt(d) if mask[b, i] and mask[b, j] else 0.0
                      for j in range(s_len)] for i in range(s_len)] for h in range(heads)]
        out.append([[[sum(per_head[g + x][i][j] for x in range(group)) / group for j in range(s_len)]
                     for i in range(s_len)] for g in range(0, heads, group)])
    return out


def _hand_mse(a, b):
    flat_a = [x for batch in a for head in batch for row in head for x in row]
    flat_b = [x for batch in b for head in batch for row in head for x in row]
    return sum((x - y) ** 2 for x, y in zip(flat_a, flat_b, strict=True)) / len(flat_a)


def test_tinybert_attention_is_the_mse_of_masked_pre_softmax_scores():
    geometry = LayerGeometry(((1, 2), (2, 4)), 8, 8, 2, 4)  # teacher 4 heads, student 2: groups of 2
    term = build_loss_terms({"tinybert_attention": {"weight": 1.0}}, geometry)["tinybert_attention"]
    assert term.groups == (1, 2) and all(term.compares(p) for p in geometry.pairs)
    s_qk = [(_randn(2, 2, 4, 3, seed=i), _randn(2, 2, 4, 3, seed=10 + i)) for i in range(2)]
    t_qk = [(_randn(2, 4, 4, 5, seed=20 + i), _randn(2, 4, 4, 5, seed=30 + i)) for i in range(2)]
    got = term.pair_losses({"pairs": geometry.pairs, "attention_qk": s_qk}, {"attention_qk": t_qk}, MASK)
    for (qs, ks), (qt, kt), value in zip(s_qk, t_qk, got, strict=True):
        want = _hand_mse(_hand_scores(qs, ks, MASK, 1), _hand_scores(qt, kt, MASK, 2))
        assert value.item() == pytest.approx(want, rel=1e-5)
    # Padded positions carry nothing: changing their Q/K changes nothing.
    noisy = [tuple(torch.where(MASK.bool()[:, None, :, None], x, 100 * torch.randn_like(x)) for x in qk) for qk in s_qk]
    again = term.pair_losses({"pairs": geometry.pairs, "attention_qk": noisy}, {"attention_qk": t_qk}, MASK)
    assert [v.item() for v in again] == pytest.approx([v.item() for v in got], rel=1e-6)
    with pytest.raises(DskdError, match="`losses.tinybert_attention`: the student has 3 attention heads"):
        build_loss_terms({"tinybert_attention": {"weight": 1.0}}, LayerGeometry(((1, 2),), 6, 8, 3, 4))


def _linear(w, b, v):
    return [sum(w[o][i] * v[i] for i in range(len(v))) + b[o] for o in range(len(w))]


def _hand_state_mse(hs, ht, mask, w, b, mask_padding):
    total, count = 0.0, 0
    for bi in range(len(hs)):
        for i in range(len(hs[bi])):
            if mask_padding and not mask[bi][i]:
                continue
            projected = _linear(w, b, hs[bi][i])
            total += sum((x - y) ** 2 for x, y in zip(projected, ht[bi][i], strict=True))
            count += len(projected)
    return total / count


@pytest.mark.parametrize("mask_padding", [True, False])
def test_tinybert_hidden_projects_every_token_and_adds_the_embeddings_to_the_bottom_layer(mask_padding):
    from dskd.training.module import DistillationModule

    geometry = LayerGeometry(((1, 2), (2, 4)), 3, 5, 1, 1)
    spec = {"weight": 1.0, "mask_padding": mask_padding}
    terms = build_loss_terms({"tinybert_hidden": spec}, geometry, seed=3)
    term = terms["tinybert_hidden"]
    assert term.needs == frozenset({"hidden", "embeddings"})
    names = [n for n, _ in DistillationModule(torch.nn.Linear(1, 1), terms, term.needs).named_parameters()]
    assert names[2:] == ["terms.tinybert_hidden.fit_dense.weight", "terms.tinybert_hidden.fit_dense.bias"]
    hs = [_randn(2, 4, 3, seed=i) for i in range(3)]  # embeddings, layer 1, layer 2
    ht = [_randn(2, 4, 5, seed=10 + i) for i in range(3)]
    student = {"pairs": geometry.pairs, "hidden": hs[1:], "embeddings": hs[0]}
    teacher = {"hidden": ht[1:], "embeddings": ht[0]}
    w, b = term.fit_dense.weight.tolist(), term.fit_dense.bias.tolist()

    def hand(i):
        return _hand_state_mse(hs[i].tolist(), ht[i].tolist(), MASK.tolist(), w, b, mask_padding)

    got = term.pair_losses(student, teacher, MASK)
    assert [v.item() for v in got] == pytest.approx([hand(1) + hand(0), hand(2)], rel=1e-5)
    # A stage that distils only layer 2 leaves the embeddings (layer 0, below layer 1) out.
    top = term.pair_losses({"pairs": ((2, 4),), "hidden": hs[2:], "embeddings": hs[0]}, {"hidden": ht[2:],
                           "embeddings": ht[0]}, MASK)
    assert top[0].item() == pytest.approx(hand(2), rel=1e-5)
    # Equal widths: no projection; `embeddings: false` needs no embedding output.
    plain = build_loss_terms({"tinybert_hidden": {**spec, "embeddings": False}},
                             LayerGeometry(((1, 2),), 5, 5, 1, 1))["tinybert_hidden"]
    assert plain.fit_dense is None and not list(plain.parameters()) and plain.needs == frozenset({"hidden"})
    eye = [[float(i == j) for j in range(5)] for i in range(5)]
    value = plain.pair_losses({"pairs": ((1, 2),), "hidden": ht[:1]}, {"hidden": ht[1:2]}, MASK)[0]
    assert value.item() == pytest.approx(
        _hand_state_mse(ht[0].tolist(), ht[1].tolist(), MASK.tolist(), eye, [0.0] * 5, mask_padding), rel=1e-5)


def test_tinybert_hidden_gradients_match_the_plain_formula_and_gradcheck():
    term = build_loss_terms({"tinybert_hidden": {"weight": 1.0}}, LayerGeometry(((1, 1),), 3, 4, 1, 1),
                            seed=0)["tinybert_hidden"].double()
    hs = _randn(2, 4, 3, seed=1).double().requires_grad_()
    ht = _randn(2, 4, 4, seed=2).double()
    assert torch.autograd.gradcheck(lambda x: term.state_mse(x, ht, MASK), (hs,))
    term.state_mse(hs, ht, MASK).backward()
    got = (hs.grad.clone(), term.fit_dense.weight.grad.clone(), term.fit_dense.bias.grad.clone())
    w, b = (p.detach().clone().requires_grad_() for p in (term.fit_dense.weight, term.fit_dense.bias))
    x = hs.detach().clone().requires_grad_()
    real = MASK.bool()
    plain = ((x @ w.t() + b - ht)[real] ** 2).mean()  # real tokens only, over tokens and features
    plain.backward()
    for a, e in zip(got, (x.grad, w.grad, b.grad), strict=True):
        torch.testing.assert_close(a, e)


def test_soft_ce_is_tinybert_soft_cross_entropy_without_t_squared():
    zs, zt = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]
    t = 2.0

    def softmax(z):
        e = [math.exp(v / t) for v in z]
        return [v / sum(e) for v in e]

    want = sum(-sum(p * math.log(q) for p, q in zip(softmax(b), softmax(a), strict=True))
               for a, b in zip(zs, zt, strict=True)) / 2
    student, teacher = {"logits": torch.tensor(zs)}, {"logits": torch.tensor(zt), "labels": torch.tensor([0, 1])}
    batchmean = build_loss_terms({"soft_ce": {"weight": 1.0, "temperature": t}})["soft_ce"]
    assert batchmean(student, teacher, None).item() == pytest.approx(want, rel=1e-6)
    mean = build_loss_terms({"soft_ce": {"weight": 1.0, "temperature": t, "reduction": "mean"}})["soft_ce"]
    assert mean(student, teacher, None).item() == pytest.approx(want / 3, rel=1e-6)  # the code's .mean()
    # Regression: MSE to the gold labels, as TinyBERT's code (not to the teacher).
    reg = batchmean({"logits": torch.tensor([[1.0], [2.0]])},
                    {"logits": torch.tensor([[9.0], [9.0]]), "labels": torch.tensor([0.5, 3.0])}, None)
    assert reg.item() == pytest.approx((0.25 + 1.0) / 2)
    from dskd.losses import validate_loss_terms

    with pytest.raises(DskdError, match="`losses.soft_ce`: reduction must be 'batchmean' or 'mean'"):
        validate_loss_terms({"soft_ce": {"weight": 1.0, "reduction": "sum"}}, "c.yaml")


# --------------------------------------------------------------------------- MiniLM


def test_minilm_compares_the_top_layer_by_attention_and_value_relation_kl():
    from test_internal import _hand_attention_kl

    geometry = LayerGeometry(((1, 2), (2, 4), (3, 6)), 8, 8, 2, 2)
    term = build_loss_terms({"minilm": {"weight": 1.0}}, geometry)["minilm"]
    assert [term.compares(p) for p in geometry.pairs] == [False, False, True]
    s_qk, t_qk = (_randn(2, 2, 4, 3, seed=0), _randn(2, 2, 4, 3, seed=1)), (_randn(2, 2, 4, 3, seed=2),
                                                                          _randn(2, 2, 4, 3, seed=3))
    vs, vt = _randn(2, 2, 4, 3, seed=4), _randn(2, 2, 4, 3, seed=5)
    got = term.pair_losses({"pairs": ((3, 6),), "attention_qk": [s_qk], "attention_v": [vs]},
                           {"attention_qk": [t_qk], "attention_v": [vt]}, MASK)
    want = _hand_attention_kl(s_qk, t_qk, MASK) + _hand_attention_kl((vs, vs), (vt, vt), MASK)
    assert len(got) == 1 and got[0].item() == pytest.approx(want, rel=1e-5)
    naive = build_loss_terms({"minilm": {"weight": 1.0, "kernel": "naive"}}, geometry)["minilm"]
    again = naive.pair_losses({"pairs": ((3, 6),), "attention_qk": [s_qk], "attention_v": [vs]},
                              {"attention_qk": [t_qk], "attention_v": [vt]}, MASK)
    assert again[0].item() == pytest.approx(want, rel=1e-5)


def test_value_relation_through_the_qk_path_passes_gradcheck():
    # softmax(V V^T / sqrt(d)) is the Q/K formula with Q = K = V; V's gradient is the sum of
    # the two slots' gradients, which autograd accumulates.
    from dskd.losses import attention_kl

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    v = _randn(3, 2, 4, 3, seed=6).double().requires_grad_()
    vt = _randn(3, 2, 4, 3, seed=7).double()
    assert torch.autograd.gradcheck(lambda x: attention_kl((x, x), (vt, vt), mask), (v,))
    vt4 = _randn(3, 4, 4, 3, seed=8).double()  # grouped teacher heads
    assert torch.autograd.gradcheck(lambda x: attention_kl((x, x), (vt4, vt4), mask, (1, 2)), (v,))


def test_value_relation_through_the_triton_kernel_matches_the_torch_path():
    from dskd.kernels import triton_available

    if not triton_available():
        pytest.skip("triton is not installed")
    from dskd.kernels.attention import attention_kl_rows_torch
    from dskd.kernels.triton_kernels import attention_kl_rows_triton

    v = _randn(2, 2, 4, 16, seed=9).requires_grad_()
    vt = _randn(2, 2, 4, 16, seed=10)
    grads = []
    for fn in (attention_kl_rows_torch, attention_kl_rows_triton):
        rows = fn((v, v), (vt, vt), MASK)
        (rows * torch.arange(1.0, 1 + rows.numel()).view_as(rows)).sum().backward()
        grads.append((rows.detach(), v.grad.clone()))
        v.grad = None
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-5)


def test_capture_hooks_values_only_when_a_term_needs_them():
    from test_internal import _tiny_bert

    from dskd.models.capture import QKCapture, forward_with_layers

    model = _tiny_bert(3, 16, 4, 0).eval()
    capture = QKCapture(model, [1, 3], "student")
    values = [model.bert.encoder.layer[i].attention.self.value for i in (0, 2)]
    inputs = {"input_ids": torch.randint(1, 60, (2, 4)), "attention_mask": MASK}
    out = forward_with_layers(model, inputs, frozenset({"logits", "attention_qk"}), capture, [1, 3])
    assert "attention_v" not in out and all(not m._forward_hooks for m in values)  # no cost for other runs
    needs = frozenset({"logits", "attention_qk", "attention_v", "hidden", "embeddings"})
    out = forward_with_layers(model, inputs, needs, capture, [3])
    forward_with_layers(model, inputs, needs, capture, [3])
    assert [len(m._forward_hooks) for m in values] == [1, 1]  # installed once
    states = model(**inputs, output_hidden_states=True).hidden_states
    attn = model.bert.encoder.layer[2].attention.self
    want = attn.value(states[2]).view(2, 4, 4, 4).transpose(1, 2)
    torch.testing.assert_close(out["attention_v"][0], want)
    torch.testing.assert_close(out["hidden"][0], states[3])
    torch.testing.assert_close(out["embeddings"], states[0])
    assert len(out["attention_qk"]) == 1


def test_minilm_logs_only_the_top_layer_through_the_distillation_module():
    from test_internal import _tiny_bert

    from dskd.models.capture import QKCapture
    from dskd.models import teacher_outputs
    from dskd.training.module import DistillationModule

    teacher, student = _tiny_bert(4, 16, 4, 0).eval(), _tiny_bert(2, 16, 4, 1)
    pairs = ((1, 2), (2, 4))
    terms = build_loss_terms({"minilm": {"weight": 1.0}, "tinybert_hidden": {"weight": 1.0}},
                             LayerGeometry(pairs, 16, 16, 4, 4))
    needs = frozenset({"logits"}).union(*(t.needs for t in terms.values()))
    module = DistillationModule(student, terms, needs, QKCapture(student, [1, 2], "student"))
    t_capture = QKCapture(teacher, [2, 4], "teacher")
    batch = {"input_ids": torch.randint(1, 60, (2, 4)), "attention_mask": MASK, "labels": torch.tensor([0, 1])}
    total, values = module(batch, teacher_outputs(teacher, batch, needs, t_capture, [2, 4]),
                           {"minilm": 1.0, "tinybert_hidden": 1.0}, pairs)
    assert set(values) == {"minilm", "minilm/L2", "tinybert_hidden", "tinybert_hidden/L1", "tinybert_hidden/L2"}
    assert values["minilm"].item() > 0 and total.requires_grad
    total.backward()
    assert student.bert.encoder.layer[1].attention.self.value.weight.grad.abs().sum() > 0  # V is trained
    _, values = module(batch, teacher_outputs(teacher, batch, needs, t_capture, [2]), {"minilm": 1.0}, ((1, 2),))
    assert values == {"minilm": values["minilm"]} and values["minilm"].item() == 0.0  # a stage without the top


# ---------------------------------------------------------------- the teacher cache


def test_the_teacher_cache_refuses_terms_that_need_what_it_does_not_store():
    from dskd.losses import spec_for

    pairs = ((1, 2), (2, 4))
    for name, missing in (("tinybert_hidden", "embeddings, hidden"), ("minilm", "attention_v")):
        with pytest.raises(DskdError, match=rf"`losses.{name}` \({name}\) needs the teacher's {missing}, which the "
                                            r"teacher cache does not store.*online teacher"):
            spec_for({name: {"weight": 1.0}, "soft_ce": {"weight": 1.0}}, pairs)
    # Attention scores and soft cross-entropy read only what the cache stores.
    spec = spec_for({"tinybert_attention": {"weight": 1.0}, "soft_ce": {"weight": 1.0}}, pairs)
    assert spec.fields == ("logits", "attention_qk") and spec.layers == (2, 4)
    assert spec_for({"minilm": {"weight": 1.0}}, pairs, strict=False).fields == ("logits", "attention_qk")


TINYBERT = {
    "teacher.arch": {"layers": 4, "hidden": 32, "heads": 4, "intermediate": 64},
    # A narrower student built from config, with half the heads: exercises fit_dense and head groups.
    "student": {"init_from_teacher": False, "arch": {"layers": 2, "hidden": 16, "heads": 2, "intermediate": 32}},
    "losses": {"tinybert_attention": {"weight": 1.0}, "tinybert_hidden": {"weight": 1.0},
               "soft_ce": {"weight": 1.0, "temperature": 1.0}},
    "schedule": [{"name": "intermediate", "epochs": 1, "losses": {"tinybert_attention": 1.0, "tinybert_hidden": 1.0}},
                 {"name": "prediction", "epochs": 1, "losses": {"soft_ce": 1.0}}],
    "training.lr_schedule": "per_stage",
    "training.save_every": 5,
    "training.deepspeed": "ds_configs/zero1_fp32.json",
}
MINILM = {
    "teacher.arch": {"layers": 4, "hidden": 32, "heads": 4, "intermediate": 64},
    "student.layers": 2,
    "losses": {"minilm": {"weight": 1.0}, "hard_ce": {"weight": 0.5}, "soft_kd": {"weight": 0.5, "temperature": 2.0}},
    "schedule": [{"name": "minilm", "epochs": 1, "losses": {"minilm": 1.0}},
                 {"name": "soft", "epochs": 1, "losses": {"soft_kd": 0.5, "hard_ce": 0.5}}],
    "training.lr_schedule": "per_stage",
    "training.save_every": 5,
    "training.deepspeed": "ds_configs/zero1_fp32.json",
}


def _two_ranks_and_exact_resume(tmp, name, overrides):
    cfg = write_config(tmp / f"{name}.yaml", overrides)
    two = run_dskd(["distill", "--config", cfg, "--output", tmp / f"{name}-2r"], tmp, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    full, split = tmp / f"{name}-full", tmp / f"{name}-split"
    first = run_dskd(["distill", "--config", cfg, "--output", full], tmp)
    assert first.returncode == 0, first.stderr[-3000:]
    assert run_dskd(["distill", "--config", cfg, "--output", split, "--set", "training.halt_after_steps=11"],
                    tmp).returncode == 0
    proc = run_dskd(["distill", "--config", cfg, "--output", split, "--resume"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(full, split)
    return first.stderr


@pytest.mark.slow
def test_tinybert_runs_on_two_ranks_and_resumes_exactly(session_tmp):
    log = _two_ranks_and_exact_resume(session_tmp, "tinybert", TINYBERT)
    assert "intermediate[0:16](tinybert_attention+tinybert_hidden), prediction[16:32](soft_ce)" in log


@pytest.mark.slow
def test_minilm_runs_on_two_ranks_and_resumes_exactly(session_tmp):
    log = _two_ranks_and_exact_resume(session_tmp, "minilm", MINILM)
    assert "minilm[0:16](minilm), soft[16:32](hard_ce+soft_kd)" in log
