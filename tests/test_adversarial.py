"""Combined-KD / MATE-KD (`mate_kd`, dskd/methods/mate_kd.py): the perturbed embeddings, the
masking, the generator's ascent on the divergence it maximises, that generator steps leave
the student alone, the cycle schedule, the term by hand, the generator's state in the state
dict, config refusals, and real runs (exact resume mid-cycle; 2 ranks under ZeRO-2)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_run, run_dskd, write_config
from dskd.methods import mate_kd as adversarial
from dskd.methods.mate_kd import MateKD, perturbed_embeddings
from dskd.methods import load_experiment
from dskd.errors import DskdError
from dskd.losses import build_loss_terms

VOCAB, PAD, CLS, SEP, MASK = 60, 0, 1, 2, 3
SPECIAL = (PAD, CLS, SEP, MASK)


def _bert(layers: int, hidden: int, seed: int, init: float = 0.02):
    from transformers import BertConfig, BertForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=2 * hidden, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
            initializer_range=init))
    return model.eval()


def _term(**spec) -> MateKD:
    spec = {"generator_layers": 1, "generator_hidden": 16, "generator_heads": 2, "generator_intermediate": 32,
            **spec}
    term = build_loss_terms({"mate_kd": {"weight": 1.0, **spec}})["mate_kd"]
    term.build_generator(VOCAB, 64, 2, PAD, MASK, SPECIAL, seed=5, device=torch.device("cpu"), key="losses.mate_kd",
                         max_length=32)
    return term


def _batch(rows: int = 6, length: int = 12, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (rows, length), generator=generator)
    lengths = torch.randint(4, length + 1, (rows,), generator=generator)
    lengths[0] = length
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(rows), lengths - 1] = SEP
    ids[mask == 0] = PAD
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.zeros(rows, dtype=torch.long)}


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- the perturbed input


def test_perturbed_embeddings_are_token_rows_outside_the_mask_and_convex_mixes_inside():
    term = _term()
    batch = _batch()
    weight = torch.randn(VOCAB, 8, generator=_rng(1))
    masked, sample = term.sample(batch, _rng(2))
    assert masked.any() and sample.shape == (int(masked.sum()), VOCAB)
    embeds = perturbed_embeddings(weight, batch["input_ids"], masked, sample)
    assert torch.equal(embeds[~masked], weight[batch["input_ids"][~masked]])  # unmasked: the token's own row
    # Masked: a convex combination of embedding rows (the hard sample's forward value is one-hot) ...
    assert (sample >= 0).all() and torch.allclose(sample.sum(-1), torch.ones(len(sample)))
    assert torch.allclose(embeds[masked], sample @ weight, atol=1e-6)
    assert torch.equal(sample.detach().max(-1).values, torch.ones(len(sample)))
    # ... and with soft weights too (any distribution over the vocabulary).
    soft = torch.softmax(torch.randn(len(sample), VOCAB, generator=_rng(3)), -1)
    mixed = perturbed_embeddings(weight, batch["input_ids"], masked, soft)
    assert torch.allclose(mixed[masked], soft @ weight, atol=1e-6)
    assert torch.equal(mixed[~masked], embeds[~masked])
    # The straight-through gradient reaches the generator.
    embeds.pow(2).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in term.generator.parameters())


def test_models_read_inputs_embeds_as_they_read_input_ids():
    """Nothing masked: student and teacher give the same logits from the perturbed embeddings.
    dskd's Q/K capture hooks, installed as in a run, store nothing in these extra forwards."""
    from dskd.models.capture import QKCapture

    batch = _batch()
    nothing = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for model in (_bert(1, 16, 0), _bert(2, 16, 1)):
        capture = QKCapture(model, [1], "model")
        embeds = perturbed_embeddings(adversarial.embedding_matrix(model), batch["input_ids"], nothing,
                                      torch.zeros(0, VOCAB))
        a = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])["logits"]
        b = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["logits"]
        assert torch.equal(a, b)
        assert not capture._store


def test_masking_rate_and_which_tokens_can_be_masked():
    term = _term(mask_prob=0.3)
    batch = _batch(rows=200, length=40, seed=4)
    masked = adversarial.choose_masked(batch["input_ids"], batch["attention_mask"], SPECIAL, 0.3, _rng(0))
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    assert not masked[~real].any()  # never padding
    assert not masked[torch.isin(ids, torch.tensor(SPECIAL))].any()  # never [CLS]/[SEP]/[PAD]/[MASK]
    maskable = real & ~torch.isin(ids, torch.tensor(SPECIAL))
    rate = masked.sum().item() / maskable.sum().item()
    assert abs(rate - 0.3) < 0.02, rate
    # The generated text differs from the original only where it was masked.
    inputs = term.generate(batch, _rng(0))
    changed = inputs["input_ids"] != ids
    assert not changed[~masked].any() and changed.any()
    assert torch.equal(inputs["attention_mask"], batch["attention_mask"])


# ------------------------------------------------------------------- generator steps


def test_generator_steps_increase_the_divergence_they_maximise():
    """A few generator steps (a large lr) on fixed student and teacher, batch, masks and noise raise
    MSE(z_s(x'), z_t(x')). Weights drawn wider than BERT's 0.02 make the logits depend on the tokens."""
    for seed in range(3):
        student, teacher = _bert(1, 16, seed, init=0.2), _bert(2, 16, seed + 10, init=0.2)
        term = _term(generator_lr=3e-2, mask_prob=0.5)
        batch = _batch(rows=8, length=12, seed=3 + seed)
        before = term.divergence(student, teacher, batch, _rng(11)).item()
        values = [term.generator_update(student, teacher, batch, _rng(11)).item() for _ in range(6)]
        after = term.divergence(student, teacher, batch, _rng(11)).item()
        assert values[0] == pytest.approx(before)  # each update returns the divergence before it
        assert after > 1.1 * before, (seed, before, values, after)


def test_generator_steps_leave_the_students_weights_and_grad_untouched():
    student, teacher = _bert(1, 16, 0).train(), _bert(2, 16, 1)
    for p in student.parameters():
        p.grad = torch.full_like(p, 0.25)
    weights = {n: p.detach().clone() for n, p in student.named_parameters()}
    generator_before = [p.detach().clone() for p in _term().generator.parameters()]
    term = _term(generator_steps=3, generator_lr=1e-2)
    values = term.generator_cycle(student, teacher, lambda k: _batch(seed=10 + k), step=0)
    assert len(values) == 3
    assert student.training  # its mode is restored
    for n, p in student.named_parameters():
        assert torch.equal(p, weights[n]) and torch.equal(p.grad, torch.full_like(p, 0.25)), n
    assert any(not torch.equal(a, b) for a, b in zip(generator_before, term.generator.parameters()))
    assert set(term.extra_logs()) == {"generator_mse_first", "generator_mse_last"}


def test_the_cycle_schedule_by_hand():
    term = _term(generator_steps=3, student_steps=5)
    assert [term.generator_due(o) for o in range(12)] == [o in (0, 5, 10) for o in range(12)]
    assert not any(_term(generator_steps=0).generator_due(o) for o in range(12))

    # Through the trainer's hook: a stage starting at step 4, 2 micro-batches per optimizer step.
    from types import SimpleNamespace

    from dskd.training.loop import StepContext

    calls = []
    term.generator_cycle = lambda student, teacher, batches, step: calls.append(("generator", step))
    term.prepare = lambda student, teacher, batch, step, micro: calls.append(("prepare", step, micro))
    engine = SimpleNamespace(module=SimpleNamespace(terms=torch.nn.ModuleDict({"mate_kd": term}), model=None))
    job = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=PAD), teacher=SimpleNamespace(model=None))
    stage = SimpleNamespace(start=4, weights={"mate_kd": 1.0})
    batch = _batch()
    for step in range(4, 16):
        for micro in (0, 1):
            assert term.before_micro_step(StepContext(job, engine, stage, step, micro, job.tokenizer), batch) is batch
    assert [c[1] for c in calls if c[0] == "generator"] == [4, 9, 14]
    assert len([c for c in calls if c[0] == "prepare"]) == 24


def test_the_term_is_the_annealed_mse_on_the_generated_text():
    from dskd.losses import AnnealingKD

    student, teacher = _bert(1, 16, 0), _bert(2, 16, 1)
    term = _term(max_temperature=4)
    annealing = AnnealingKD(max_temperature=4)
    for progress in (0.0, 0.3, 0.6, 0.99):
        term.progress = annealing.progress = progress
        assert term.factor() == annealing.factor()
    term.progress = 0.3  # factor 2/4
    batch = _batch()

    class Side:
        def outputs(self, inputs, needs, pairs, split):
            return {"logits": teacher(**inputs)["logits"]}

    term.prepare(student, Side(), batch, step=3, micro=0)
    x = term.generate(batch, term.rng(torch.device("cpu"), 3, 0, adversarial._STUDENT))
    got = term({"logits": None}, {}, batch["attention_mask"])
    want = F.mse_loss(student(**x)["logits"], 0.5 * teacher(**x)["logits"])
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(RuntimeError, match="without generated text"):
        term({"logits": None}, {}, batch["attention_mask"])  # consumed: a second call has nothing prepared


def test_generator_and_its_optimizer_travel_in_the_state_dict():
    student, teacher = _bert(1, 16, 0), _bert(2, 16, 1)
    term = _term(generator_lr=1e-2)
    term.generator_update(student, teacher, _batch(), _rng(0))
    fresh = _term(generator_lr=1e-2)
    fresh.load_state_dict(term.state_dict())
    for a, b in zip(term.generator.parameters(), fresh.generator.parameters()):
        assert torch.equal(a, b)
    # The next step is the same on both: Adam's moments came along.
    term.generator_update(student, teacher, _batch(seed=1), _rng(1))
    fresh.generator_update(student, teacher, _batch(seed=1), _rng(1))
    for a, b in zip(term.generator.parameters(), fresh.generator.parameters()):
        assert torch.equal(a, b)
    assert list(term.parameters()) == []  # DeepSpeed's optimizer never sees the generator


# ----------------------------------------------------------------------------- config


def test_bad_settings_are_refused_by_key(tmp_path):
    for spec, message in (({"mask_prob": 0.0}, r"`losses.mate_kd`: mask_prob"),
                          ({"generator_hidden": 30, "generator_heads": 4}, r"`losses.mate_kd`: generator_hidden"),
                          ({"generator_lr": "fast"}, r"`losses.mate_kd.generator_lr` must be a number"),
                          ({"student_steps": 0}, r"`losses.mate_kd`: generator_steps must be 0 or more and "
                                                 r"student_steps")):
        cfg = write_config(tmp_path / "c.yaml", {"losses": {"mate_kd": {"weight": 1.0, **spec}}})
        with pytest.raises(DskdError, match=message):
            load_experiment(cfg)

    def bound(overrides):
        cfg = load_experiment(write_config(tmp_path / "b.yaml", overrides))
        build_loss_terms(cfg.losses)["mate_kd"].bind_run(cfg, "losses.mate_kd")

    with pytest.raises(DskdError, match=r"`losses.mate_kd.max_temperature` is 1 but "
                                        r"`losses.annealing_kd.max_temperature` is 7"):
        bound({"losses": {"annealing_kd": {"weight": 1.0}, "mate_kd": {"weight": 1.0}}})
    with pytest.raises(DskdError, match=r"`schedule\[0\].plateau` \(a\) cannot end a stage where `losses.mate_kd`"):
        bound({"losses": {"mate_kd": {"weight": 1.0}},
               "schedule": [{"name": "a", "epochs": 1, "plateau": {"every": 5}}]})
    with pytest.raises(DskdError, match=r"`losses.mate_kd` runs the teacher on the generator's text"):
        bound({"losses": {"mate_kd": {"weight": 1.0}}, "teacher.cache": str(tmp_path)})


# ------------------------------------------------------------------------------- runs

GEN = {"generator_layers": 1, "generator_hidden": 32, "generator_heads": 2, "generator_intermediate": 64}
COMBINED = {
    "losses": {"hard_ce": {"weight": 1 / 3}, "annealing_kd": {"weight": 1 / 3, "max_temperature": 4},
               "mate_kd": {"weight": 1 / 3, "max_temperature": 4, "generator_steps": 2, "student_steps": 5,
                           "generator_lr": 1e-4, **GEN}},
    "schedule": [{"name": "anneal", "epochs": 1, "losses": {"hard_ce": 1 / 3, "annealing_kd": 1 / 3,
                                                             "mate_kd": 1 / 3}, "keep_best": True},
                 {"name": "labels", "epochs": 1, "losses": {"hard_ce": 1.0}}],
    "training.eval_every": 4,
    "training.save_every": 5,
    "training.lr_schedule": "per_stage",
}


def test_zero3_is_refused_before_anything_is_written(session_tmp):
    cfg = write_config(session_tmp / "mate-z3.yaml", COMBINED)
    proc = run_dskd(["distill", "--config", cfg, "--output", session_tmp / "mate-z3", "--deepspeed",
                     "ds_configs/zero3_fp32.json"], session_tmp)
    assert proc.returncode != 0 and "ZeRO-3 partitions" in proc.stderr and "use ZeRO stage 0, 1 or 2" in proc.stderr
    assert not (session_tmp / "mate-z3").exists()


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_combined_kd_resumes_exactly_from_the_middle_of_a_cycle(session_tmp):

    cfg = write_config(session_tmp / "mate.yaml", COMBINED)
    full, split = session_tmp / "mate-full", session_tmp / "mate-split"
    log = _ok(run_dskd(["distill", "--config", cfg, "--output", full], session_tmp)).stderr
    assert "continuing from its best weights" in log
    # Step 7 is inside the cycle that began at step 5 (generator steps before steps 0, 5, 10, 15).
    _ok(run_dskd(["distill", "--config", cfg, "--output", split, "--set", "training.halt_after_steps=7"],
                 session_tmp))
    _ok(run_dskd(["distill", "--config", cfg, "--output", split, "--resume"], session_tmp))
    assert_same_run(full, split)
    # The generator (in the term's extra state) ended alike too, and it did train.
    states = [torch.load(r / "checkpoints" / "step00000032" / "mp_rank_00_model_states.pt", weights_only=False)
              ["module"]["terms.mate_kd._extra_state"] for r in (full, split)]
    assert all(torch.equal(v, states[1]["generator"][k]) for k, v in states[0]["generator"].items())
    # 2 generator steps before stage steps 0, 5, 10, 15; keep_best rewinds it with the student's best step.
    steps = [int(state["optimizer"]["state"][0]["step"]) for state in states]
    assert steps[0] == steps[1] and steps[0] in (2, 4, 6, 8)


@pytest.mark.slow
def test_combined_kd_runs_on_two_ranks_under_zero2(session_tmp):
    cfg = write_config(session_tmp / "mate-2r.yaml", COMBINED)
    two = _ok(run_dskd(["distill", "--config", cfg, "--output", session_tmp / "mate-2r", "--deepspeed",
                        "ds_configs/zero2_fp32.json"], session_tmp, nproc=2))
    assert "[stage] step 8: anneal -> labels" in two.stderr
    metrics = json.loads((session_tmp / "mate-2r" / "metrics.json").read_text())
    assert metrics["step"] == 16
