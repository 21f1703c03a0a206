"""Internal-representation KD: attention KL, [CLS] cosine, capture hooks, stages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dskd.models.capture import QKCapture
from dskd.config import PlateauConfig, StageConfig, TrainingConfig
from dskd.errors import DskdError
from dskd.losses import (
    AttentionKL,
    ClsCosine,
    LayerGeometry,
    attention_kl,
    build_loss_terms,
    head_groups,
)
from dskd.models import resolve_layer_map
from dskd.training.module import DistillationModule
from dskd.training.stages import Stage, lr_factor, plan_stages, shorten_stage, stage_pairs


def _qk(b, h, s, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, s, d, generator=g), torch.randn(b, h, s, d, generator=g)


def _hand_attention_kl(student_qk, teacher_qk, mask, groups=(1, 1)):
    """The loop-by-loop formula: per real query row, softmax over real keys only."""
    (qs, ks), (qt, kt) = student_qk, teacher_qk
    b_size, s_len = mask.shape

    def dists(q, k, b, i, group):
        h_count, d = q.shape[1], q.shape[-1]
        keys = [j for j in range(s_len) if mask[b, j]]
        out = []
        for h in range(h_count):
            scores = [float(q[b, h, i] @ k[b, h, j]) / math.sqrt(d) for j in keys]
            top = max(scores)
            z = sum(math.exp(v - top) for v in scores)
            out.append([math.exp(v - top) / z for v in scores])
        # average consecutive groups of heads
        return [[sum(col) / group for col in zip(*out[g : g + group], strict=True)] for g in range(0, h_count, group)]

    total, rows, heads = 0.0, 0, None
    for b in range(b_size):
        for i in range(s_len):
            if not mask[b, i]:
                continue
            rows += 1
            ps, pt = dists(qs, ks, b, i, groups[0]), dists(qt, kt, b, i, groups[1])
            heads = len(ps)
            for p_s, p_t in zip(ps, pt, strict=True):
                total += sum(t * (math.log(t) - math.log(s)) for s, t in zip(p_s, p_t, strict=True) if t > 0)
    return total / (heads * rows) if rows else 0.0


# Example 0: 4 real tokens then 1 pad; example 1: 2 real; example 2: fully padded.
MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])


def test_attention_kl_matches_hand_computation_with_padding_and_a_fully_padded_row():
    s_qk, t_qk = _qk(3, 2, 5, 4, 0), _qk(3, 2, 5, 4, 1)
    value = attention_kl(s_qk, t_qk, MASK)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(_hand_attention_kl(s_qk, t_qk, MASK), rel=1e-5)
    assert attention_kl(t_qk, t_qk, MASK).item() == pytest.approx(0.0, abs=1e-6)
    # Padded positions carry no information: changing them changes nothing.
    noisy = tuple(torch.where(MASK.bool()[:, None, :, None], x, torch.randn_like(x) * 50) for x in s_qk)
    assert attention_kl(noisy, t_qk, MASK).item() == pytest.approx(value.item(), rel=1e-6)


def test_attention_kl_of_an_all_padding_batch_is_zero_not_nan():
    s_qk, t_qk = _qk(2, 2, 3, 4, 0), _qk(2, 2, 3, 4, 1)
    q = s_qk[0].clone().requires_grad_()
    value = attention_kl((q, s_qk[1]), t_qk, torch.zeros(2, 3, dtype=torch.long))
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(q.grad).all()


def test_attention_kl_gradients_pass_gradcheck_including_padding():
    s_qk, t_qk = _qk(3, 2, 5, 3, 2), _qk(3, 2, 5, 3, 3)
    q, k = (x.double().requires_grad_() for x in s_qk)
    t_qk = tuple(x.double() for x in t_qk)
    assert torch.autograd.gradcheck(lambda q_, k_: attention_kl((q_, k_), t_qk, MASK), (q, k))


def test_attention_kl_groups_teacher_heads_and_student_heads():
    # Teacher 4 heads, student 2: teacher heads (1,2) and (3,4) averaged.
    s_qk, t_qk = _qk(2, 2, 5, 4, 4), _qk(2, 4, 5, 4, 5)
    groups = head_groups(2, 4, "auto", "losses.attention_kl")
    assert groups == (1, 2)
    assert attention_kl(s_qk, t_qk, MASK[:2], groups).item() == pytest.approx(
        _hand_attention_kl(s_qk, t_qk, MASK[:2], groups), rel=1e-5
    )
    # The other way round, and the head-averaged rule.
    assert head_groups(4, 2, "auto", "k") == (2, 1)
    assert head_groups(3, 2, "mean", "k") == (3, 2)
    s3 = _qk(2, 3, 5, 4, 6)
    assert attention_kl(s3, t_qk, MASK[:2], (3, 4)).item() == pytest.approx(
        _hand_attention_kl(s3, t_qk, MASK[:2], (3, 4)), rel=1e-5
    )
    with pytest.raises(DskdError, match=r"`losses.att`: the student has 3 attention heads and the teacher 2.*heads: mean"):
        head_groups(3, 2, "auto", "losses.att")


def test_attention_kl_accumulates_low_precision_inputs_in_fp32():
    s_qk, t_qk = _qk(2, 2, 5, 8, 7), _qk(2, 2, 5, 8, 8)
    reference = attention_kl(s_qk, t_qk, MASK[:2])
    for dtype in (torch.bfloat16, torch.float16):
        low = attention_kl(tuple(x.to(dtype) for x in s_qk), tuple(x.to(dtype) for x in t_qk), MASK[:2])
        assert low.dtype == torch.float32
        assert low.item() == pytest.approx(reference.item(), rel=0.05)


def test_capture_reproduces_dropout_free_attention_without_eager_attention():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=32, attention_probs_dropout_prob=0.5, hidden_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    eager = BertForSequenceClassification(config)
    eager.load_state_dict(model.state_dict())
    eager.config._attn_implementation = "eager"
    eager.eval()
    ids = torch.randint(1, 50, (2, 5))
    capture = QKCapture(model, [1, 3], "student")
    capture.active = {1, 3}
    model(input_ids=ids, attention_mask=MASK[:2])
    (q1, k1), (q3, k3) = capture.take([1, 3])
    attentions = eager(input_ids=ids, attention_mask=MASK[:2], output_attentions=True).attentions
    from dskd.losses import attention_log_probs

    for (q, k), layer in (((q1, k1), 1), ((q3, k3), 3)):
        probs = attention_log_probs(q, k, MASK[:2].bool()).exp()
        real = MASK[:2].bool()[:, None, :, None]  # compare real query rows
        torch.testing.assert_close(torch.where(real, probs, 0), torch.where(real, attentions[layer - 1], 0))
    # In training mode the returned eager attentions are after dropout (rows no longer sum
    # to 1); the distributions rebuilt from captured Q/K are not. Layer 1's Q/K see only the
    # embeddings (hidden dropout is 0 here), so they equal the eval-mode ones exactly.
    model.train()
    eager.train()
    capture.active = {1}
    model(input_ids=ids, attention_mask=MASK[:2])
    (q_train, k_train), = capture.take([1])
    torch.testing.assert_close(q_train, q1)
    train_probs = attention_log_probs(q_train, k_train, MASK[:2].bool()).exp()
    torch.testing.assert_close(train_probs.sum(-1), torch.ones(2, 4, 5))
    dropped = eager(input_ids=ids, attention_mask=MASK[:2], output_attentions=True).attentions[0]
    assert not torch.allclose(dropped.sum(-1)[:, :, :2], torch.ones(2, 4, 2))
    model.eval()
    # Inactive layers store nothing; hooks can be removed.
    capture.active = {1}
    model(input_ids=ids, attention_mask=MASK[:2])
    with pytest.raises(RuntimeError, match="layer 3 was not captured"):
        capture.take([1, 3])
    capture.remove()
    model(input_ids=ids)
    assert capture.take([]) == []


def test_cls_cosine_matches_hand_computation_and_projects_other_widths():
    hs = [torch.tensor([[1.0, 0.0], [1.0, 1.0]])]
    ht = [torch.tensor([[0.0, 1.0], [2.0, 2.0]])]
    term = ClsCosine()
    term.bind(LayerGeometry(((1, 2),), 2, 2, 1, 1), "losses.cls_cosine")
    assert len(term.projections) == 0
    value = term({"pairs": ((1, 2),), "cls": hs}, {"cls": ht}, None)
    assert value.item() == pytest.approx(((1 - 0.0) + (1 - 1.0)) / 2)

    wide = ClsCosine()
    wide.bind(LayerGeometry(((1, 2), (2, 4)), 3, 5, 1, 1), "losses.cls_cosine")
    assert sorted(wide.projections) == ["L1", "L2"] and wide.projections["L1"].weight.shape == (5, 3)
    hs = [torch.randn(4, 3, requires_grad=True) for _ in range(2)]
    ht = [torch.randn(4, 5) for _ in range(2)]
    parts = wide.pair_losses({"pairs": ((1, 2), (2, 4)), "cls": hs}, {"cls": ht}, None)
    expected = (1 - F.cosine_similarity(wide.projections["L2"](hs[1]), ht[1], dim=-1)).mean()
    assert parts[1].item() == pytest.approx(expected.item(), rel=1e-6)
    sum(parts).backward()
    assert wide.projections["L1"].weight.grad is not None and hs[0].grad is not None


def _tiny_bert(layers, hidden, heads, seed):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=60, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def test_distillation_module_with_mismatched_width_and_heads_trains_the_projection():
    teacher, student = _tiny_bert(4, 16, 4, 0).eval(), _tiny_bert(2, 12, 2, 1)
    pairs = tuple(resolve_layer_map(None, [], 2, 4))
    assert pairs == ((1, 2), (2, 4))
    geometry = LayerGeometry(pairs, 12, 16, 2, 4)
    losses = {"attention_kl": {"weight": 1.0}, "cls_cosine": {"weight": 1.0}}
    terms = build_loss_terms(losses, geometry, seed=0)
    assert terms["attention_kl"].groups == (1, 2)
    module = DistillationModule(student, terms, frozenset({"logits", "attention_qk", "cls"}),
                                QKCapture(student, [1, 2], "student"))
    assert any(name.startswith("terms.cls_cosine.projections.L1") for name, _ in module.named_parameters())
    from dskd.models import teacher_outputs

    batch = {"input_ids": torch.randint(1, 60, (2, 5)), "attention_mask": MASK[:2], "labels": torch.tensor([0, 1])}
    t_capture = QKCapture(teacher, [2, 4], "teacher")
    target = teacher_outputs(teacher, batch, module.needs, t_capture, [2, 4])
    total, values = module(batch, target, {"attention_kl": 1.0, "cls_cosine": 1.0}, pairs)
    assert set(values) == {"attention_kl", "attention_kl/L1", "attention_kl/L2",
                           "cls_cosine", "cls_cosine/L1", "cls_cosine/L2"}
    assert total.item() == pytest.approx(sum(values[k].item() for k in ("attention_kl", "cls_cosine")), rel=1e-6)
    total.backward()
    assert module.terms["cls_cosine"].projections["L2"].weight.grad.abs().sum() > 0
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    # One PID stage distils only its layer: only layer 1 is captured and scored.
    total, values = module(batch, teacher_outputs(teacher, batch, module.needs, t_capture, [2]),
                           {"attention_kl": 1.0}, pairs[:1])
    assert set(values) == {"attention_kl", "attention_kl/L1"}


def test_layer_map_is_checked_against_both_models():
    assert resolve_layer_map(None, [2, 4, 6], 3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert resolve_layer_map(None, [], 6, 12) == [(k, 2 * k) for k in range(1, 7)]
    assert resolve_layer_map([1, 6], [3, 6], 2, 6) == [(1, 1), (2, 6)]
    with pytest.raises(DskdError, match=r"`layer_map\[1\]` is 7, out of range: the teacher has 6 layers"):
        resolve_layer_map([2, 7], [], 2, 6)
    with pytest.raises(DskdError, match=r"`layer_map` lists 3 teacher layers but the student has 2"):
        resolve_layer_map([2, 4, 6], [], 2, 6)
    with pytest.raises(DskdError, match="set `layer_map`"):
        resolve_layer_map(None, [], 4, 2)


def _stages(specs, layers=(1, 2, 3)):
    losses = {"attention_kl": {"weight": 1.0}, "cls_cosine": {"weight": 1.0}, "soft_kd": {"weight": 1.0}}
    return plan_stages(specs, losses, TrainingConfig(), steps_per_epoch=10, mapped_layers=list(layers))


def test_pid_and_sid_expand_bottom_up_and_share_the_stage_length():
    internal = {"losses": {"attention_kl": 1.0, "cls_cosine": 1.0}}
    soft = StageConfig("soft", epochs=1, losses={"soft_kd": 1.0})
    pid = _stages([StageConfig("pid", steps=7, per_layer="progressive", **internal), soft], layers=(3, 1, 2))
    assert [(s.name, s.start, s.end, s.layers) for s in pid] == [
        ("pid-L1", 0, 3, (1,)), ("pid-L2", 3, 5, (2,)), ("pid-L3", 5, 7, (3,)), ("soft", 7, 17, None)]
    sid = _stages([StageConfig("sid", epochs=0.6, per_layer="stacked", **internal), soft])
    assert [(s.name, s.end, s.layers) for s in sid] == [
        ("sid-L1", 2, (1,)), ("sid-L2", 4, (1, 2)), ("sid-L3", 6, (1, 2, 3)), ("soft", 16, None)]
    pairs = ((1, 2), (2, 4), (3, 6))
    assert stage_pairs(sid[1], pairs) == ((1, 2), (2, 4)) and stage_pairs(sid[3], pairs) == pairs
    assert pid[3].weights == {"soft_kd": 1.0}


def test_plateau_shortening_moves_later_stages_and_the_lr_schedule():
    stages = [Stage("a", 0, 10, {}), Stage("b", 10, 20, {}, plateau=PlateauConfig(every=2)), Stage("c", 20, 30, {})]
    shorten_stage(stages, 1, 14)
    assert [(s.start, s.end) for s in stages] == [(0, 10), (10, 14), (14, 24)]
    per_stage = TrainingConfig(warmup_ratio=0.2, lr_schedule="per_stage")
    assert [lr_factor(step, stages, per_stage) for step in (0, 1, 2, 10, 14, 16)] == [0.0, 0.5, 1.0, 1.0, 0.0, 1.0]


def test_global_lr_factor_equals_transformers_linear_schedule():
    from transformers import get_linear_schedule_with_warmup

    training = TrainingConfig(warmup_ratio=0.1)
    stages = [Stage("a", 0, 37, {}), Stage("b", 37, 50, {})]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_linear_schedule_with_warmup(opt, int(0.1 * 50), 50).lr_lambdas[0]
    assert [lr_factor(s, stages, training) for s in range(51)] == pytest.approx([reference(s) for s in range(51)])


def test_attention_kl_rejects_unknown_head_rule():
    with pytest.raises(ValueError, match="heads must be 'auto' or 'mean'"):
        AttentionKL(heads="max")


def test_refresh_lr_applies_the_shortened_stage_table_to_the_next_step():
    from types import SimpleNamespace

    from dskd.training.stages import refresh_lr

    training = TrainingConfig(warmup_ratio=0.0, lr_schedule="per_stage", lr=1.0)
    stages = [Stage("a", 0, 10, {}), Stage("b", 10, 20, {})]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, stages, training))
    for _ in range(4):
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.6)  # step 4 of stage a (10 steps)
    shorten_stage(stages, 0, 4)  # a plateau ends stage a at step 4: step 4 starts stage b
    refresh_lr(SimpleNamespace(lr_scheduler=scheduler))
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0) and scheduler.get_last_lr() == [pytest.approx(1.0)]


def test_attention_figure_draws_the_compared_distributions_over_real_tokens():
    from dskd.losses import attention_log_probs
    from dskd.training.attention_figure import attention_figure, attention_maps, head_label

    mask = torch.tensor([[1, 1, 1, 0]])
    s_qk, t_qk = _qk(1, 2, 4, 4, 9), _qk(1, 4, 4, 4, 10)  # teacher heads averaged in pairs
    teacher, student = attention_maps(s_qk, t_qk, mask, (1, 2), heads=2)
    assert teacher.shape == student.shape == (2, 3, 3)  # 2 compared heads over the 3 real tokens
    t_probs = attention_log_probs(*t_qk, mask.bool()).exp()[0, :, :3, :3]
    torch.testing.assert_close(torch.from_numpy(teacher), (t_probs[0::2] + t_probs[1::2]) / 2)
    torch.testing.assert_close(torch.from_numpy(student), attention_log_probs(*s_qk, mask.bool()).exp()[0, :, :3, :3])
    assert teacher.sum(-1) == pytest.approx(1.0, rel=1e-5)
    assert (head_label(0, 1), head_label(1, 2)) == ("head 1", "heads 3-4")
    image = attention_figure(teacher, student, ["[CLS]", "a", "[SEP]", "[PAD]"], (2, 4), (1, 2))
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert (np.abs(image[..., 0].astype(int) - image[..., 2]) > 50).mean() > 0.05  # a colour map, not grey


def test_layer_options_without_a_layer_wise_term_are_refused_by_name():
    from dskd.config import ExperimentConfig
    from dskd.training.job import build_terms
    from dskd.training.stages import check_stage_layers

    teacher, student = _tiny_bert(4, 16, 4, 0), _tiny_bert(2, 16, 4, 1)
    cfg = ExperimentConfig(layer_map=[2, 4])
    with pytest.raises(DskdError, match=r"^`layer_map` is set but no loss term compares layers; add attention_kl"):
        build_terms(cfg, {"soft_kd": {"weight": 1.0}}, student.config, teacher.config, [2, 4])
    terms, pairs = build_terms(ExperimentConfig(), {"cls_cosine": {"weight": 1.0}}, student.config, teacher.config, [2, 4])
    assert pairs == ((1, 2), (2, 4)) and len(terms["cls_cosine"].projections) == 0
    cfg = ExperimentConfig(schedule=[StageConfig("pid", epochs=1, per_layer="progressive")])
    with pytest.raises(DskdError, match=r"^`schedule\[0\].per_layer` \(pid\) needs a layer-wise loss term"):
        check_stage_layers(cfg, ())
