"""KroneckerBERT: Kronecker layers against the dense product, nearest Kronecker product,
the factored student (counts, capture, export), config errors and a real run with resume."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_dskd, write_config
from dskd.methods import load_experiment
from dskd.errors import DskdError
from dskd.models.kronecker import (
    KroneckerEmbedding,
    KroneckerLinear,
    kronecker_config,
    kronecker_linear,
    kroneckerize,
    load_pretrained,
    nearest_kronecker,
    parameter_counts,
    rearrange,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _linear(shape_a, shape_b, seed, dtype=torch.float64):
    layer = KroneckerLinear(shape_a, shape_b, dtype=dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=_gen(seed), dtype=dtype))
            seed += 1
    return layer


# ----------------------------------------------------------------------- the layers


def test_kronecker_linear_equals_the_dense_product_with_the_same_gradients():
    layer = _linear((3, 4), (5, 2), seed=0)
    assert (layer.in_features, layer.out_features) == (8, 15)
    x = torch.randn(2, 3, 8, generator=_gen(9), dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 3, 15) and y.is_contiguous()
    dense = torch.kron(layer.A, layer.B)
    assert torch.equal(layer.dense_weight(), dense) and dense.shape == (15, 8)
    want = x @ dense.t() + layer.bias
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(y.shape, generator=_gen(10), dtype=torch.float64)
    got = torch.autograd.grad(y, (layer.A, layer.B, layer.bias, x), upstream)
    ref = torch.autograd.grad(want, (layer.A, layer.B, layer.bias, x), upstream)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    no_bias = KroneckerLinear((2, 2), (2, 2), bias=False)
    assert no_bias.bias is None and no_bias(torch.ones(4)).shape == (4,)
    assert layer.compression == pytest.approx((15 * 8 + 15) / (12 + 10 + 15))


def test_kronecker_linear_gradcheck():
    args = [torch.randn(shape, generator=_gen(seed), dtype=torch.float64, requires_grad=True)
            for seed, shape in enumerate([(2, 6), (2, 3), (3, 2), (6,)])]
    assert torch.autograd.gradcheck(kronecker_linear, args)
    assert torch.autograd.gradgradcheck(kronecker_linear, args)


def test_kronecker_embedding_looks_up_rows_of_the_product_without_forming_it():
    emb = KroneckerEmbedding(10, (4, 2), (3, 3), dtype=torch.float64)  # 12 rows >= 10; dim 6
    with torch.no_grad():
        emb.A.copy_(torch.randn(4, 2, generator=_gen(1), dtype=torch.float64))
        emb.B.copy_(torch.randn(3, 3, generator=_gen(2), dtype=torch.float64))
    ids = torch.tensor([[0, 1, 2, 3], [9, 5, 5, 7]])
    table = emb.dense_weight()
    assert table.shape == (10, 6)
    out = emb(ids)
    want = table[ids]
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(out.shape, generator=_gen(3), dtype=torch.float64)
    for g, r in zip(torch.autograd.grad(out, (emb.A, emb.B), upstream),
                    torch.autograd.grad(want, (emb.A, emb.B), upstream), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    assert emb.compression == pytest.approx(60 / 17)


# --------------------------------------------------------------- nearest Kronecker


def test_rearrangement_turns_a_kronecker_product_into_an_outer_product():
    a = torch.randn(3, 4, generator=_gen(0), dtype=torch.float64)
    b = torch.randn(2, 5, generator=_gen(1), dtype=torch.float64)
    assert torch.equal(rearrange(torch.kron(a, b), (3, 4), (2, 5)), torch.outer(a.flatten(), b.flatten()))


def test_nearest_kronecker_recovers_an_exact_product():
    a = torch.randn(16, 8, generator=_gen(0))
    b = torch.randn(2, 4, generator=_gen(1))
    w = torch.kron(a, b)
    fa, fb = nearest_kronecker(w, (16, 8), (2, 4))
    assert fa.dtype == torch.float32 and fa.shape == (16, 8) and fb.shape == (2, 4)
    torch.testing.assert_close(torch.kron(fa, fb), w, rtol=1e-5, atol=1e-6)
    # The factors themselves are a and b up to a scalar (and the fixed sign).
    ratio = fa / a
    torch.testing.assert_close(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-4, atol=1e-5)


def test_nearest_kronecker_is_the_best_rank_one_approximation():
    w = torch.randn(12, 10, generator=_gen(5), dtype=torch.float64)
    a, b = nearest_kronecker(w, (4, 5), (3, 2))
    err = torch.linalg.norm(w - torch.kron(a, b))
    s = torch.linalg.svdvals(rearrange(w, (4, 5), (3, 2)))
    assert err.item() == pytest.approx(s[1:].pow(2).sum().sqrt().item(), rel=1e-10)  # Eckart–Young
    for seed in range(20):
        ra = torch.randn(4, 5, generator=_gen(100 + seed), dtype=torch.float64)
        rb = torch.randn(3, 2, generator=_gen(200 + seed), dtype=torch.float64)
        best_scale = (torch.kron(ra, rb) * w).sum() / torch.kron(ra, rb).pow(2).sum()  # even rescaled optimally
        assert err <= torch.linalg.norm(w - best_scale * torch.kron(ra, rb))
        near = torch.linalg.norm(w - torch.kron(a + 1e-3 * ra, b + 1e-3 * rb))
        assert err <= near
    with pytest.raises(ValueError, match=r"not \[4\*3, 5\*3\]"):
        nearest_kronecker(w, (4, 5), (3, 3))


# --------------------------------------------------------------- the student model


def _tiny_bert(seed=0, layers=2, hidden=32, intermediate=64, kron_weights=False):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=60, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=intermediate, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    if kron_weights:  # make every factored weight an exact Kronecker product
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and ".encoder.layer." in f".{name}":
                    m, n = module.weight.shape
                    module.weight.copy_(torch.kron(torch.randn(m // 2, n // 2), torch.randn(2, 2)) * 0.05)
    return model


SPEC = {"attention": [2, 2], "intermediate": [2, 2], "output": [2, 2]}
REPLACED = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
            "intermediate.dense", "output.dense")


def test_kroneckerize_replaces_the_layer_maps_and_counts_parameters():
    dense = _tiny_bert()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    student = kroneckerize(dense, {**SPEC, "embeddings": [4, 4]})
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())  # the source is untouched
    assert type(student).__name__ == "KroneckerBertForSequenceClassification"
    assert student.config.model_type == "kronecker_bert" and student.config.kronecker["attention"] == [2, 2]
    for i, layer in enumerate(student.bert.encoder.layer):
        for path in REPLACED:
            module = layer.get_submodule(path)
            assert isinstance(module, KroneckerLinear)
            assert module.dense_weight().shape == dense.get_submodule(f"bert.encoder.layer.{i}.{path}").weight.shape
    assert isinstance(student.bert.pooler.dense, torch.nn.Linear) and isinstance(student.classifier, torch.nn.Linear)
    emb = student.bert.embeddings.word_embeddings
    assert isinstance(emb, KroneckerEmbedding) and emb.A.shape == (15, 8) and emb.B.shape == (4, 4)
    # Copied unchanged: LayerNorms, position embeddings, pooler, head.
    for key in ("bert.embeddings.position_embeddings.weight", "bert.encoder.layer.1.output.LayerNorm.weight",
                "bert.pooler.dense.weight", "classifier.weight", "bert.encoder.layer.0.attention.self.query.bias"):
        assert torch.equal(student.state_dict()[key], before[key])
    counts = parameter_counts(student)
    # Per layer: 4 attention maps [32,32] -> A[16,16]+B[2,2] and bias 32; FFN [64,32]/[32,64] -> 32*16 + 4.
    per_layer_kron = 4 * (256 + 4 + 32) + (512 + 4 + 64) + (512 + 4 + 32)
    per_layer_dense = 4 * (1024 + 32) + (2048 + 64) + (2048 + 32)
    assert counts["replaced_modules"] == 13
    assert counts["replaced_kronecker"] == 2 * per_layer_kron + 15 * 8 + 16
    assert counts["replaced_dense"] == 2 * per_layer_dense + 60 * 32
    assert counts["total"] == sum(p.numel() for p in student.parameters())
    assert counts["dense_total"] == sum(p.numel() for p in dense.parameters())
    assert counts["compression"] == pytest.approx(counts["replaced_dense"] / counts["replaced_kronecker"])
    assert counts["model_compression"] == pytest.approx(counts["dense_total"] / counts["total"])
    # `layers` limits the factoring; the config (as `dskd plan` counts it) gives the same model.
    one = kroneckerize(dense, {"attention": [2, 2], "layers": [2]})
    assert isinstance(one.bert.encoder.layer[0].attention.self.query, torch.nn.Linear)
    assert isinstance(one.bert.encoder.layer[1].attention.self.key, KroneckerLinear)
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        planned = AutoModelForSequenceClassification.from_config(kronecker_config(dense.config, SPEC))
    assert sum(p.numel() for p in planned.parameters()) == parameter_counts(kroneckerize(dense, SPEC))["total"]


def test_a_kronecker_teacher_is_reproduced_exactly_and_qk_capture_still_works():
    from dskd.models.capture import QKCapture

    dense = _tiny_bert(seed=1, kron_weights=True)
    student = kroneckerize(dense, SPEC).eval()
    ids = torch.randint(1, 60, (3, 7), generator=_gen(0))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 5:] = 0
    captures = [QKCapture(m, [1, 2], who) for m, who in ((dense, "teacher"), (student, "student"))]
    logits = []
    for model, capture in zip((dense, student), captures, strict=True):
        capture.active = {1, 2}
        with torch.no_grad():
            logits.append(model(input_ids=ids, attention_mask=mask).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)
    want, got = captures[0].take([1, 2]), captures[1].take([1, 2])
    for (qd, kd), (qs, ks) in zip(want, got, strict=True):
        assert qs.shape == (3, 2, 7, 16) and ks.shape == qs.shape  # [B, heads, S, head_dim]
        torch.testing.assert_close(qs, qd, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ks, kd, rtol=1e-4, atol=1e-5)


def test_export_folder_loads_back_with_identical_logits(tmp_path):
    from transformers import AutoModelForSequenceClassification

    student = kroneckerize(_tiny_bert(seed=2), {**SPEC, "embeddings": [7, 4]}).eval()
    student.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 60, (2, 6), generator=_gen(1))
    with torch.no_grad():
        want = student(input_ids=ids).logits
        for loaded in (load_pretrained(tmp_path / "m"),
                       AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")):
            assert type(loaded) is type(student)
            assert torch.equal(loaded.eval()(input_ids=ids).logits, want)


def test_a_roberta_student_and_a_random_init():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    dense = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=40, pad_token_id=1)).eval()
    student = kroneckerize(dense, {"attention": [4, 2], "embeddings": [5, 2]}, init="random", seed=3).eval()
    assert type(student).__name__ == "KroneckerRobertaForSequenceClassification"
    assert student(input_ids=torch.tensor([[0, 5, 7, 2, 1]])).logits.shape == (1, 2)
    again = kroneckerize(dense, {"attention": [4, 2], "embeddings": [5, 2]}, init="random", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), again.state_dict().values()))


# ------------------------------------------------------------------------- config


@pytest.mark.parametrize("kronecker, message", [
    ({"attention": [2]}, r"`student\.kronecker\.attention` must be the shape \[m2, n2\]"),
    ({"attention": [2, 0]}, r"`student\.kronecker\.attention` must be the shape"),
    ({"layers": [1]}, r"`student\.kronecker` compresses nothing"),
    ({"attention": [2, 2], "layers": [3]}, r"`student\.kronecker\.layers` names layer 3, but the student has 1"),
    ({"attention": [2, 2], "layers": []}, r"`student\.kronecker\.layers` lists 1-based"),
    ({"atention": [2, 2]}, r"unknown key `student\.kronecker\.atention`; did you mean `student\.kronecker\.attention`"),
    ({"ffn": [2, 2]}, r"unknown key `student\.kronecker\.ffn`"),
    ({"output": "2x2"}, r"`student\.kronecker\.output` must be a list of an integer, got .2x2."),
])
def test_config_errors_name_the_key(tmp_path, kronecker, message):
    with pytest.raises(DskdError, match=message):
        load_experiment(write_config(tmp_path / "c.yaml", {"student.kronecker": kronecker}))


def test_shapes_that_do_not_divide_the_model_are_refused_naming_the_key(tmp_path):
    arch = {"layers": 1, "hidden": 32, "heads": 2, "intermediate": 64}
    with pytest.raises(DskdError, match=r"`student\.kronecker\.intermediate` is \[3, 2\], which does not divide "
                                        r"the \[64, 32\] weights"):
        load_experiment(write_config(tmp_path / "c.yaml", {"student": {"init_from_teacher": False, "arch": arch,
                                                                   "kronecker": {"intermediate": [3, 2]}}}))
    cfg = load_experiment(write_config(tmp_path / "ok.yaml", {"student.kronecker": {"attention": [5, 2]}}))
    with pytest.raises(DskdError, match=r"`student\.kronecker\.attention` is \[5, 2\], which does not divide the "
                                        r"\[32, 32\]"):
        kroneckerize(_tiny_bert(), cfg.student.kronecker)
    with pytest.raises(DskdError, match=r"`student\.kronecker\.embeddings` is \[4, 3\]: 3 does not divide the hidden"):
        kroneckerize(_tiny_bert(), {"embeddings": [4, 3]})


def test_build_student_factors_a_copy_and_leaves_the_teacher_alone(tmp_path):
    from dskd.methods import enabled_methods
    from dskd.methods.kronecker import KroneckerStudent
    from dskd.models import build_student

    cfg = load_experiment(write_config(tmp_path / "c.yaml", {"student.kronecker": SPEC}))
    methods = enabled_methods(cfg, "distill")
    assert [type(m) for m in methods] == [KroneckerStudent]  # the plugin builds the student, through its hook
    teacher = _tiny_bert(seed=4, kron_weights=True)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, layers = build_student(cfg.student, teacher, 2, 0, cfg.seed)
    student = methods[0].build_student(student, cfg)
    assert layers == [2] and student.config.num_hidden_layers == 1
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # Teacher layer 2 is exactly Kronecker, so its factors reproduce it.
    q = student.bert.encoder.layer[0].attention.self.query
    torch.testing.assert_close(q.dense_weight(), before["bert.encoder.layer.1.attention.self.query.weight"],
                               rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- a real run

KRON_RUN = {
    "teacher.arch": {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64},
    "student.layers": 2,
    "student.kronecker": {"attention": [2, 2], "intermediate": [4, 2], "output": [2, 4], "embeddings": [4, 4]},
    "losses": {"attention_kl": {"weight": 1.0}, "cls_cosine": {"weight": 1.0}, "hard_ce": {"weight": 0.5},
               "soft_kd": {"weight": 0.5, "temperature": 2.0}},
    "schedule": [{"name": "internal", "epochs": 1, "losses": {"attention_kl": 1.0, "cls_cosine": 1.0}},
                 {"name": "soft", "epochs": 1, "losses": {"soft_kd": 0.5, "hard_ce": 0.5}}],
    "training.save_every": 5,
}


@pytest.mark.slow
def test_kronecker_student_distils_resumes_exactly_and_exports(session_tmp):
    from safetensors.torch import load_file

    cfg = write_config(session_tmp / "kron.yaml", KRON_RUN)
    full, split = session_tmp / "kron-full", session_tmp / "kron-split"
    proc = run_dskd(["distill", "--config", cfg, "--output", full], session_tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[student] KroneckerBERT (attention B=[2, 2]" in proc.stderr
    assert "stages: internal[0:16](attention_kl+cls_cosine), soft[16:32](" in proc.stderr
    assert run_dskd(["distill", "--config", cfg, "--output", split, "--set", "training.halt_after_steps=11"],
                    session_tmp).returncode == 0
    proc = run_dskd(["distill", "--config", cfg, "--output", split, "--resume"], session_tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(str(full / "model" / "model.safetensors")), load_file(str(split / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "bert.encoder.layer.0.attention.self.query.A" in a and "bert.embeddings.word_embeddings.B" in a
    assert json.loads((full / "metrics.json").read_text()) == json.loads((split / "metrics.json").read_text())
    # `dskd export` and the run's model/ load back as the same model.
    out = session_tmp / "kron-export"
    proc = run_dskd(["export", "--run", full, "--out", out], session_tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = torch.randint(1, 30000, (2, 9), generator=_gen(0))
    with torch.no_grad():
        logits = [load_pretrained(folder).eval()(input_ids=ids).logits for folder in (full / "model", out)]
    assert torch.equal(logits[0], logits[1])
    assert json.loads((out / "config.json").read_text())["model_type"] == "kronecker_bert"


@pytest.mark.slow
def test_kronecker_student_from_the_teacher_cache_equals_the_online_run(session_tmp):
    """The cached path builds the student from the teacher's safetensors (only the copied
    tensors read) and factors it as the online path does."""
    from safetensors.torch import load_file
    from transformers import BertTokenizerFast

    from conftest import BERT_VOCAB
    from dskd.config import ArchConfig
    from dskd.models import build_from_arch

    root = session_tmp / "kron-cache"
    tokenizer = BertTokenizerFast(vocab=str(BERT_VOCAB))
    build_from_arch(ArchConfig(layers=2, hidden=32, heads=2, intermediate=64), len(tokenizer), 2,
                    tokenizer.pad_token_id, 3, "teacher.arch").save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    cfg = write_config(root / "kron.yaml", {**KRON_RUN, "teacher": {"path": str(root / "teacher")},
                                            "training.epochs": 1, "schedule": [KRON_RUN["schedule"][0]]})
    proc = run_dskd(["cache-teacher", "--config", cfg, "--output", root / "store", "--batch-size", 16], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {}
    for name, extra in (("online", []), ("cached", ["--set", f"teacher.cache={root / 'store'}"])):
        proc = run_dskd(["distill", "--config", cfg, "--output", root / name, *extra], root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "[student] KroneckerBERT" in proc.stderr
        runs[name] = load_file(str(root / name / "model" / "model.safetensors"))
    assert "bert.encoder.layer.1.output.dense.A" in runs["cached"]
    # Equal up to fp32 rounding: the cache-writing teacher saw other batch shapes (docs/design.md).
    assert runs["online"].keys() == runs["cached"].keys()
    for key, value in runs["online"].items():
        torch.testing.assert_close(runs["cached"][key], value, rtol=1e-4, atol=1e-5)
