"""Universal-KD: pseudo-classifiers, the attention-based layer projection by hand, gradients,
models that differ in depth/width/heads, `dskd train-probes`, refusals, resume and 2 ranks."""

from __future__ import annotations

import json
import math
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_same_run, run_dskd, write_config
from dskd.errors import DskdError
from dskd.losses import LayerGeometry, build_loss_terms
from dskd.methods.universal_kd import MANIFEST, PROBES_FORMAT, PROBES_VERSION, WEIGHTS, UniversalKD
from dskd.methods.universal_probes import fit_probes, probe_accuracy


def _randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def write_probes(folder, probes: dict, hidden: int, depth: int, num_labels: int = 2, task: str = "sst2",
                 teacher: str = "hash") -> None:
    """A probe folder as `dskd train-probes` writes it, with given (weight, bias) per teacher layer."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer, (w, b) in probes.items():
        tensors[f"L{layer}.weight"], tensors[f"L{layer}.bias"] = w.float().contiguous(), b.float().contiguous()
    save_file(tensors, str(folder / WEIGHTS))
    manifest = {"format": PROBES_FORMAT, "version": PROBES_VERSION, "teacher": teacher, "teacher_source": "test",
                "task": task, "num_labels": num_labels, "hidden": hidden, "teacher_depth": depth,
                "layers": sorted(probes), "dev_accuracy": {f"L{i}": 0.5 for i in probes}}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _random_probes(folder, hidden, depth, num_labels=2, layers=None, **kw):
    write_probes(folder, {i: (_randn(num_labels, hidden, seed=i), _randn(num_labels, seed=50 + i))
                          for i in (layers or range(1, depth + 1))}, hidden, depth, num_labels, **kw)


def _term(folder, geometry, **spec) -> UniversalKD:
    spec = {"weight": 1.0, "teacher_probes": str(folder), **spec}
    return build_loss_terms({"universal_kd": spec}, geometry, seed=0)["universal_kd"]


GEOMETRY = LayerGeometry(((1, 2), (2, 3)), 3, 2, 1, 1, 2, 3)  # student 2 layers x 3 wide, teacher 3 x 2


# ------------------------------------------------------------------- the formula


def _softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    return [x / sum(e) for x in e]


def _linear(w, b, v):
    return [sum(w[c][d] * v[d] for d in range(len(v))) + b[c] for c in range(len(w))]


def _hand(term, hs, ht, tau, distance):
    """L_uni written out: pseudo-classifiers, alpha_{j,i}, target_j, KL (or squared error)."""
    t_layers, s_layers = term.t_layers, term.s_layers
    wt, bt = term.teacher_weight.tolist(), term.teacher_bias.tolist()
    batch = len(ht[0])
    total, alphas = 0.0, []
    for j in s_layers:
        lin = term.classifiers[f"L{j}"]
        ws, bs = lin.weight.tolist(), lin.bias.tolist()
        per_example = []
        for b in range(batch):
            q_t = [_softmax(_linear(wt[k], bt[k], ht[i - 1][b])) for k, i in enumerate(t_layers)]
            q_s = _softmax(_linear(ws, bs, hs[j - 1][b]))
            alpha = _softmax([sum(x * y for x, y in zip(q_s, q)) / tau for q in q_t])
            alphas.append(alpha)
            target = [sum(alpha[k] * q_t[k][c] for k in range(len(q_t))) for c in range(len(q_s))]
            if distance == "kl":
                per_example.append(sum(t * math.log(t / s) for t, s in zip(target, q_s)))
            else:
                per_example.append(sum((t - s) ** 2 for t, s in zip(target, q_s)))
        total += sum(per_example) / batch
    return total, alphas


@pytest.mark.parametrize("distance, tau, detach", [("kl", 1.0, False), ("kl", 0.1, True), ("mse", 0.5, False)])
def test_the_loss_against_a_hand_computation(tmp_path, distance, tau, detach):
    _random_probes(tmp_path / "p", hidden=2, depth=3)
    term = _term(tmp_path / "p", GEOMETRY, distance=distance, attention_temperature=tau, detach_attention=detach)
    assert term.s_layers == [1, 2] and term.t_layers == [1, 2, 3]  # default: every layer of both
    hs = [_randn(2, 3, seed=10 + j) for j in range(2)]
    ht = [_randn(2, 2, seed=20 + i) for i in range(3)]
    loss = term({"cls_all": hs, "pairs": GEOMETRY.pairs}, {"cls_all": ht}, torch.ones(2, 4))
    want, alphas = _hand(term, [h.tolist() for h in hs], [h.tolist() for h in ht], tau, distance)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    logs = term.extra_logs()
    assert set(logs) == {"L1", "L2"} and (logs["L1"] + logs["L2"]).item() == pytest.approx(want, rel=1e-5)
    got = term.last_alpha.permute(1, 0, 2).reshape(-1, 3).tolist()  # [J, B, I] in the hand's order
    assert [a for row in got for a in row] == pytest.approx([a for row in alphas for a in row], rel=1e-5)


def test_the_projection_weights_sum_to_one_over_teacher_layers(tmp_path):
    _random_probes(tmp_path / "p", hidden=2, depth=3)
    for tau in (1.0, 0.05):
        term = _term(tmp_path / "p", GEOMETRY, attention_temperature=tau, teacher_layers=[1, 3])
        hs = [_randn(5, 3, seed=j) * 10 for j in range(2)]
        ht = [_randn(5, 2, seed=9 + i) * 10 for i in range(3)]
        term({"cls_all": hs}, {"cls_all": ht}, torch.ones(5, 4))
        alpha = term.last_alpha
        assert alpha.shape == (5, 2, 2)  # [batch, student layers, teacher layers 1 and 3]
        assert torch.allclose(alpha.sum(-1), torch.ones(5, 2), atol=1e-6) and (alpha >= 0).all()
    # With identical probabilities from every teacher layer the target is that distribution.
    q = torch.tensor([[0.2, 0.8]])
    z_s = torch.zeros(1, 2, 2, requires_grad=True)
    term.loss_from_logits(z_s, q[:, None].expand(1, 3, 2))
    assert torch.allclose(term.last_alpha, torch.full((1, 2, 3), 1 / 3))


def test_gradients_gradcheck_in_float64_and_detach_changes_only_the_path_through_alpha(tmp_path):
    _random_probes(tmp_path / "p", hidden=2, depth=3)
    for distance in ("kl", "mse"):
        term = _term(tmp_path / "p", GEOMETRY, distance=distance, attention_temperature=0.3).double()
        ht = [_randn(2, 2, seed=20 + i, dtype=torch.float64) for i in range(3)]
        hs = tuple(_randn(2, 3, seed=10 + j, dtype=torch.float64).requires_grad_() for j in range(2))
        assert torch.autograd.gradcheck(lambda *h: term({"cls_all": list(h)}, {"cls_all": ht}, None), hs)
        names = [n for n, _ in term.named_parameters()]  # the student's pseudo-classifiers
        params = tuple(p.detach().clone().requires_grad_() for p in term.parameters())
        inputs = ({"cls_all": [h.detach() for h in hs]}, {"cls_all": ht}, None)
        assert torch.autograd.gradcheck(lambda *w: torch.func.functional_call(term, dict(zip(names, w)), inputs),
                                        params)
    # detach_attention: the gradient treats alpha as a constant (not the function's true gradient, so no
    # gradcheck): it is that of sum_j KL(target_j || q_s_j) with the same target held fixed; without it the
    # gradient differs.
    z_s = _randn(3, 2, 2, seed=1, dtype=torch.float64).requires_grad_()
    q_t = torch.softmax(_randn(3, 3, 2, seed=2, dtype=torch.float64), -1)
    grads = {}
    for detach in (False, True):
        term = _term(tmp_path / "p", GEOMETRY, detach_attention=detach).double()
        grads[detach] = torch.autograd.grad(term.loss_from_logits(z_s, q_t), z_s)[0]
    target = torch.einsum("bji,bic->bjc", term.last_alpha, q_t)
    fixed = (target * (target.log() - torch.log_softmax(z_s, -1))).sum(-1).mean(0).sum()
    assert torch.allclose(grads[True], torch.autograd.grad(fixed, z_s)[0], atol=1e-12)
    assert not torch.allclose(grads[True], grads[False])


def test_teacher_and_student_of_different_depth_width_and_heads(tmp_path):
    from test_internal import _tiny_bert

    from dskd.models.capture import forward_with_layers
    from dskd.models import resolve_layer_map, teacher_outputs
    from dskd.training.module import DistillationModule

    teacher, student = _tiny_bert(4, 32, 4, 0).eval(), _tiny_bert(2, 16, 2, 1)
    pairs = tuple(resolve_layer_map(None, [], 2, 4))
    geometry = LayerGeometry(pairs, 16, 32, 2, 4, 2, 4)
    _random_probes(tmp_path / "p", hidden=32, depth=4)
    batch = {"input_ids": torch.randint(1, 60, (3, 6)), "attention_mask": torch.ones(3, 6, dtype=torch.long),
             "labels": torch.tensor([0, 1, 1])}
    batch["attention_mask"][0, 4:] = 0
    for spec in ({}, {"student_layers": [2], "teacher_layers": [3, 4]}):
        losses = {"hard_ce": {"weight": 1.0}, "universal_kd": {"weight": 1.0, "teacher_probes": str(tmp_path / "p"),
                                                                **spec}}
        terms = build_loss_terms(losses, geometry, seed=0)
        term = terms["universal_kd"]
        names = [n for n, _ in terms.named_parameters()]
        assert names == [f"universal_kd.classifiers.L{j}.{p}" for j in term.s_layers for p in ("weight", "bias")]
        assert {n for n, _ in terms.named_buffers()} == {"universal_kd.teacher_weight", "universal_kd.teacher_bias"}
        assert term.teacher_weight.shape == (len(term.t_layers), 2, 32)
        module = DistillationModule(student, terms, frozenset({"logits", "cls_all"}))
        t_out = teacher_outputs(teacher, batch, module.needs, None, [t for _, t in pairs])
        assert len(t_out["cls_all"]) == 4 and t_out["cls_all"][0].shape == (3, 32)
        student.zero_grad()
        total, values = module(batch, t_out, {"hard_ce": 1.0, "universal_kd": 1.0}, pairs)
        assert set(values) == {"hard_ce", "universal_kd"} | {f"universal_kd/L{j}" for j in term.s_layers}
        total.backward()
        layer = student.bert.encoder.layer[term.s_layers[0] - 1].output.dense.weight
        assert layer.grad is not None and layer.grad.abs().sum() > 0
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.parameters())
    # `cls_all` is every layer's first-token vector, whatever the mapped layers are.
    out = forward_with_layers(student, {k: batch[k] for k in ("input_ids", "attention_mask")},
                              frozenset({"cls_all"}), None, [2])
    states = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     output_hidden_states=True).hidden_states
    assert len(out["cls_all"]) == 2 and all(torch.equal(a, s[:, 0]) for a, s in zip(out["cls_all"], states[1:]))
    assert "cls_all" not in forward_with_layers(student, {"input_ids": batch["input_ids"]}, frozenset({"cls_all"}),
                                                None, [])  # evaluation passes (no layers) pay nothing


# ------------------------------------------------------------------ refusals


def test_bad_probe_folders_are_refused_naming_the_key(tmp_path):
    key = "`losses.universal_kd.teacher_probes`"
    with pytest.raises(DskdError, match=r"`losses.universal_kd.teacher_probes` is not set: train .* `dskd train-probes"):
        build_loss_terms({"universal_kd": {"weight": 1.0}}, GEOMETRY)
    with pytest.raises(DskdError, match=key + r": .*nope does not exist; write it with `dskd train-probes"):
        _term(tmp_path / "nope", GEOMETRY)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(DskdError, match=key + r": .*other is not a teacher-probe folder"):
        _term(tmp_path / "other", GEOMETRY)
    _random_probes(tmp_path / "wide", hidden=4, depth=3)
    with pytest.raises(DskdError, match=key + r" \(.*wide\) holds probes of a teacher of hidden size 4; this "
                                              r"teacher's is 2"):
        _term(tmp_path / "wide", GEOMETRY)
    _random_probes(tmp_path / "deep", hidden=2, depth=6)
    with pytest.raises(DskdError, match=r"holds probes of a 6-layer teacher; this teacher has 3 layers"):
        _term(tmp_path / "deep", GEOMETRY)
    _random_probes(tmp_path / "some", hidden=2, depth=3, layers=[2, 3])
    with pytest.raises(DskdError, match=r"has probes for teacher layers \[2, 3\], not for \[1\], which "
                                        r"`losses.universal_kd.teacher_layers` needs"):
        _term(tmp_path / "some", GEOMETRY)
    assert _term(tmp_path / "some", GEOMETRY, teacher_layers=[3]).t_layers == [3]  # enough for this one
    with pytest.raises(DskdError, match=r"`losses.universal_kd.student_layers` lists layer 3, but the student has 2"):
        _term(tmp_path / "some", GEOMETRY, student_layers=[1, 3], teacher_layers=[2])


def test_config_validation_names_the_option(tmp_path):
    from dskd.methods import load_experiment

    for spec, message in (({"distance": "l1"}, "distance must be 'kl' or 'mse'"),
                          ({"attention_temperature": 0}, "attention_temperature must be positive"),
                          ({"student_layers": [0, 1]}, "student_layers must be null"),
                          ({"teacher_layers": [2, 2]}, "teacher_layers lists a layer twice"),
                          ({"detach_attention": "yes"}, "must be true or false")):
        cfg = write_config(tmp_path / "c.yaml", {"losses": {"universal_kd": {"weight": 1.0, **spec}}})
        with pytest.raises(DskdError, match=r"losses.universal_kd.*" + message):
            load_experiment(cfg)


def test_probes_of_another_task_or_teacher_and_cached_or_pro_kd_runs_are_refused(tmp_path):
    from dskd.losses import spec_for
    from dskd.teacher.cache import teacher_fingerprint
    from dskd.methods import load_experiment

    arch = {"layers": 3, "hidden": 2, "heads": 1, "intermediate": 4}
    cfg = load_experiment(write_config(tmp_path / "c.yaml", {"teacher.arch": arch}))
    right = teacher_fingerprint(cfg.teacher, cfg.seed)
    _random_probes(tmp_path / "ok", hidden=2, depth=3, teacher=right)
    _term(tmp_path / "ok", GEOMETRY).bind_run(cfg, "losses.universal_kd")  # the right teacher and task
    _random_probes(tmp_path / "rte", hidden=2, depth=3, task="rte", teacher=right)
    with pytest.raises(DskdError, match=r"holds probes for task rte \(2 labels\); this run is sst2"):
        _term(tmp_path / "rte", GEOMETRY).bind_run(cfg, "losses.universal_kd")
    other = load_experiment(write_config(tmp_path / "c2.yaml", {"teacher.arch": arch, "seed": 8}))  # another init
    with pytest.raises(DskdError, match=r"were trained on another teacher .* rerun `dskd train-probes`"):
        _term(tmp_path / "ok", GEOMETRY).bind_run(other, "losses.universal_kd")
    cached = load_experiment(write_config(tmp_path / "c3.yaml", {"teacher.arch": arch, "teacher.cache": str(tmp_path)}))
    with pytest.raises(DskdError, match=r"`losses.universal_kd` needs the \[CLS\] vector of every teacher layer "
                                        r"\(cls_all\), which the teacher cache does not store"):
        _term(tmp_path / "ok", GEOMETRY).bind_run(cached, "losses.universal_kd")
    with pytest.raises(DskdError, match=r"`losses.universal_kd` \(universal_kd\) needs the teacher's cls_all, which "
                                        r"the teacher cache does not store"):
        spec_for({"universal_kd": {"weight": 1.0}}, ((1, 2),))
    assert spec_for({"universal_kd": {"weight": 1.0}}, ((1, 2),), strict=False).fields == ("logits",)  # dskd plan
    pro = load_experiment(write_config(tmp_path / "c4.yaml", {
        "teacher.arch": arch, "losses": {"hard_ce": {"weight": 1.0}, "universal_kd": {"weight": 1.0}},
        "schedule": [{"name": "a", "epochs": 1, "teacher": str(tmp_path)}]}))
    with pytest.raises(DskdError, match=r"`schedule\[0\].teacher` \(a\) replaces the teacher"):
        _term(tmp_path / "ok", GEOMETRY).bind_run(pro, "losses.universal_kd")


# ------------------------------------------------------------ dskd train-probes


@pytest.fixture
def one_thread():
    """Tiny matrices: with busy cores, thread hand-offs cost 100x the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fit_probes_separates_separable_data_whatever_the_feature_scale(one_thread):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, 5, generator=g)
    x[:, :, 0] *= 1000.0  # one huge, useless dimension, as BERT's [CLS] vectors have
    y = (x[:, 0, 1] + x[:, 0, 2] > 0).long()
    x[:, 1, 3] = torch.where(y == 1, 2.0, -2.0) + 0.1 * torch.randn(400, generator=g)  # layer 2: margin
    weight, bias = fit_probes(x, y, 2, epochs=30, lr=1e-2, batch_size=64, seed=0)
    acc = probe_accuracy(x, y, weight, bias)  # the folded weights act on the raw vectors
    assert acc[1] == 1.0 and acc[0] > 0.95
    again = fit_probes(x, y, 2, epochs=30, lr=1e-2, batch_size=64, seed=0)
    assert torch.equal(again[0], weight) and torch.equal(again[1], bias)  # deterministic


def test_train_probes_reports_dev_accuracy_saves_probes_that_load_back_and_refuses_other_folders(tmp_path, one_thread):
    from dskd import data, models
    from dskd.teacher import online
    from dskd.methods import load_experiment
    from dskd.methods.universal_probes import collect_cls, train_probes

    arch = {"layers": 3, "hidden": 16, "heads": 2, "intermediate": 32}
    cfg_path = write_config(tmp_path / "c.yaml", {"teacher.arch": arch, "data.train_limit": 64, "data.dev_limit": 32,
                                                  "losses.universal_kd": {"weight": 1.0, "teacher_layers": [2, 3]}})
    cfg = load_experiment(cfg_path)
    out = tmp_path / "probes"
    manifest = train_probes(cfg, out, epochs=5)
    assert manifest["layers"] == [2, 3]  # the config's universal_kd.teacher_layers
    assert json.loads((out / MANIFEST).read_text()) == manifest and sorted(p.name for p in out.iterdir()) == [
        MANIFEST, WEIGHTS]
    assert manifest["task"] == "sst2" and manifest["hidden"] == 16 and manifest["teacher_depth"] == 3
    assert manifest["examples"] == {"train": 64, "dev": 32}
    # The reported dev accuracy is that of the saved probes on the teacher's dev [CLS] vectors.
    task, tokenizer = data.get_task("sst2"), models.load_tokenizer(cfg.teacher)
    _, dev = data.load_data(cfg, task, tokenizer)
    teacher = models.freeze(online.load_teacher(cfg, task, tokenizer), torch.float32, torch.device("cpu"))
    x, y = collect_cls(teacher, dev, tokenizer, 8, [2, 3], "cpu")
    saved = load_file(str(out / WEIGHTS))
    w = torch.stack([saved["L2.weight"], saved["L3.weight"]])
    b = torch.stack([saved["L2.bias"], saved["L3.bias"]])
    assert probe_accuracy(x, y, w, b) == pytest.approx([manifest["dev_accuracy"]["L2"], manifest["dev_accuracy"]["L3"]])
    # They load back into the term for this teacher and task (the layers it asks for).
    geometry = LayerGeometry(((1, 2),), 8, 16, 2, 2, 1, 3)
    term = _term(out, geometry, teacher_layers=[2, 3])
    term.bind_run(cfg, "losses.universal_kd")
    assert torch.equal(term.teacher_weight, w) and torch.equal(term.teacher_bias, b)
    with pytest.raises(DskdError, match=r"has probes for teacher layers \[2, 3\], not for \[1\]"):
        _term(out, geometry)
    # Refusals: existing probes without --overwrite, a folder of something else, regression, several ranks.
    with pytest.raises(DskdError, match=r"already holds teacher probes; pass --overwrite"):
        train_probes(cfg, out, epochs=1)
    old_umask = os.umask(0o027)
    try:
        assert train_probes(cfg, out, epochs=1, layers=[1], overwrite=True)["layers"] == [1]
    finally:
        os.umask(old_umask)
    # Group-readable as the umask allows (safetensors alone writes 0o600).
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]} == {
        "probes": 0o750, MANIFEST: 0o640, WEIGHTS: 0o640}
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(DskdError, match=r"is not empty and holds no teacher probes; choose another folder"):
        train_probes(cfg, tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    with pytest.raises(DskdError, match=r"stsb, a regression task"):
        train_probes(load_experiment(cfg_path, ["data.task=stsb"]), tmp_path / "p2")
    with pytest.raises(DskdError, match=r"--layers \[9\]: the teacher has layers 1 to 3"):
        train_probes(cfg, tmp_path / "p3", layers=[9])


def test_train_probes_refuses_several_ranks(tmp_path, monkeypatch):
    from dskd.methods import load_experiment
    from dskd.methods.universal_probes import train_probes

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DskdError, match="runs in one process"):
        train_probes(load_experiment(write_config(tmp_path / "c.yaml")), tmp_path / "p")


# ------------------------------------------------------------------ end to end


UNIVERSAL = {
    "teacher.arch": {"layers": 4, "hidden": 32, "heads": 4, "intermediate": 64},
    "student.init_from_teacher": False,
    "student.arch": {"layers": 2, "hidden": 16, "heads": 2, "intermediate": 32},
    "training.save_every": 5,
    "training.deepspeed": "ds_configs/zero1_fp32.json",
}


def _universal_config(root, name):
    losses = {"hard_ce": {"weight": 0.5}, "soft_kd": {"weight": 0.5, "temperature": 2.0},
              "universal_kd": {"weight": 1.0, "teacher_probes": str(root / "uk-probes")}}
    return write_config(root / name, {**UNIVERSAL, "losses": losses})


@pytest.fixture(scope="module")
def probes(session_tmp):
    cfg = _universal_config(session_tmp, "uk.yaml")
    proc = run_dskd(["train-probes", "--config", cfg, "--output", session_tmp / "uk-probes"], session_tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cfg, proc


@pytest.mark.slow
def test_universal_kd_resumes_exactly(session_tmp, probes):
    cfg, trained = probes
    assert "probe L4: dev accuracy" in trained.stdout and "teacher probes dev: {" in trained.stdout
    again = run_dskd(["train-probes", "--config", cfg, "--output", session_tmp / "uk-probes"], session_tmp)
    assert again.returncode == 2 and "already holds teacher probes; pass --overwrite" in again.stderr
    full, split = session_tmp / "uk-full", session_tmp / "uk-split"
    proc = run_dskd(["distill", "--config", cfg, "--output", full], session_tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_dskd(["distill", "--config", cfg, "--output", split, "--set", "training.halt_after_steps=11"],
                    session_tmp).returncode == 0
    proc = run_dskd(["distill", "--config", cfg, "--output", split, "--resume"], session_tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(full, split)
    from dskd.training.checkpoint import latest_tag

    states = []
    for run in (full, split):
        tag = latest_tag(run / "checkpoints")
        states.append(torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"])
    for name in ("classifiers.L1.weight", "classifiers.L2.bias", "teacher_weight"):
        key = f"terms.universal_kd.{name}"
        assert torch.equal(states[0][key], states[1][key]), key


@pytest.mark.slow
def test_universal_kd_runs_on_two_ranks_with_zero2(session_tmp, probes):
    cfg, _ = probes
    out = session_tmp / "uk-2r"
    proc = run_dskd(["distill", "--config", cfg, "--output", out, "--set", "training.epochs=1",
                     "--set", "training.deepspeed=ds_configs/zero2_fp32.json"], session_tmp, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/loss/universal_kd", "train/loss/universal_kd/L1", "train/loss/universal_kd/L2"} <= set(
        events.Tags()["scalars"])
