"""Task-agnostic (corpus) distillation: the chunked vocabulary loss against autograd, the
per-block masks, the representation term, the job kind's checks, and real runs: one rank
with an exact mid-stream resume, two ranks under ZeRO-2 and ZeRO-3, and the export that
starts a task stage (``student.init``)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import BERT_VOCAB, REPO, assert_same_run, run_dskd

from dskd.errors import DskdError
from dskd.kernels.vocab import vocab_loss, vocab_loss_reference
from dskd.methods import load_experiment

TINY_GENERAL = REPO / "configs" / "general" / "tiny.yaml"


def _tokenizer():
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab=str(BERT_VOCAB))


def _config(tmp_path, name="general.yaml", **overrides) -> str:
    cfg = yaml.safe_load(TINY_GENERAL.read_text())
    cfg["data"]["max_length"] = 32
    cfg["data"]["corpus"]["held_out"] = 0.02
    cfg["data"]["corpus"]["max_blocks"] = 96
    cfg["training"].update(batch_size=8, log_every=2, save_every=4)
    for dotted, value in overrides.items():
        node = cfg
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


# ------------------------------------------------------------------ the vocabulary kernel


@pytest.mark.parametrize("ce, kd", [(1.0, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_chunked_vocabulary_loss_matches_autograd_on_the_whole_logits(ce, kd):
    torch.manual_seed(0)
    m, d_s, d_t, vocab = 23, 12, 20, 97
    hs = torch.randn(m, d_s, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, d_s, dtype=torch.float64, requires_grad=True)
    b = torch.randn(vocab, dtype=torch.float64, requires_grad=True)
    ht, wt, bt = torch.randn(m, d_t), torch.randn(vocab, d_t), torch.randn(vocab)
    labels = torch.randint(vocab, (m,))
    loss, means = vocab_loss(hs, w, b, labels, ht, wt, bt, temperature=2.0, ce_weight=ce, kd_weight=kd, chunk=5)
    ref, ref_means = vocab_loss_reference(hs, w, b, labels, ht, wt, bt, temperature=2.0, ce_weight=ce, kd_weight=kd)
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    assert torch.allclose(means[:2].double(), ref_means[:2].double(), rtol=1e-5) or kd == 0
    assert float(means[2]) == pytest.approx(float(ref_means[2]))
    grads = torch.autograd.grad(3.0 * loss, [hs, w, b])
    ref_grads = torch.autograd.grad(3.0 * ref, [hs, w, b])
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_vocabulary_kd_by_hand_on_two_words():
    # One masked token, vocabulary of 2, identity projections: logits are the hidden rows.
    hs = torch.tensor([[1.0, 0.0]], requires_grad=True)
    eye = torch.eye(2)
    ht = torch.tensor([[0.0, 2.0]])
    loss, means = vocab_loss(hs, eye, None, torch.tensor([1]), ht, eye, None, temperature=2.0, ce_weight=0.0,
                             kd_weight=1.0)
    p_t = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    q = torch.softmax(torch.tensor([0.5, 0.0]), 0)
    expected = 4.0 * float((p_t * (p_t.log() - q.log())).sum())
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(means[2]) == 0.0  # the student's argmax (word 0) is not the label (word 1)


def test_vocabulary_loss_without_masked_tokens_is_zero_with_zero_gradients():
    hs = torch.zeros(0, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    loss, _ = vocab_loss(hs, w, None, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss) == 0.0 and float(w.grad.abs().sum()) == 0.0


# ------------------------------------------------------------------ masks


def _blocks(n=6, length=20):
    tok = _tokenizer()
    ids = torch.randint(1000, 2000, (n, length))
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    return tok, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "idx": torch.arange(10, 10 + n)}


def test_masks_follow_seed_epoch_and_block_not_the_batch():
    from dskd.data.corpus import BlockMasker

    tok, batch = _blocks()
    masker = BlockMasker(tok, 0.3, seed=5)
    whole = masker(dict(batch), epoch=1)
    # The same blocks in another batch, in another order: each block gets the same mask.
    order = torch.tensor([4, 1, 0])
    part = masker({k: v[order] for k, v in batch.items()}, epoch=1)
    assert torch.equal(part["input_ids"], whole["input_ids"][order])
    assert torch.equal(part["labels"], whole["labels"][order])
    again = BlockMasker(tok, 0.3, seed=5)(dict(batch), epoch=1)
    assert torch.equal(again["input_ids"], whole["input_ids"])
    other_epoch = masker(dict(batch), epoch=2)
    assert not torch.equal(other_epoch["labels"], whole["labels"])
    masked = whole["labels"] != -100
    assert not masked[:, 0].any() and not masked[:, -1].any()  # [CLS] and [SEP] are never masked
    assert torch.equal(whole["labels"][masked], batch["input_ids"][masked])  # labels: the original tokens
    assert (whole["input_ids"][~masked] == batch["input_ids"][~masked]).all()


def test_mask_rate_and_the_80_10_10_split():
    from dskd.data.corpus import BlockMasker

    tok = _tokenizer()
    ids = torch.randint(1000, 2000, (400, 64))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "idx": torch.arange(400)}
    out = BlockMasker(tok, 0.15, seed=0)(batch, epoch=0)
    masked = out["labels"] != -100
    assert masked.float().mean().item() == pytest.approx(0.15, abs=0.01)
    replaced = out["input_ids"][masked] == tok.mask_token_id
    assert replaced.float().mean().item() == pytest.approx(0.8, abs=0.02)
    kept = out["input_ids"][masked] == ids[masked]
    assert kept.float().mean().item() == pytest.approx(0.1, abs=0.02)


# ------------------------------------------------------------------ the hidden cosine term


def test_hidden_cosine_is_one_minus_cos_over_real_tokens_of_the_top_layer():
    from dskd.losses import HiddenCosine, LayerGeometry

    term = HiddenCosine()  # layers: top
    term.bind(LayerGeometry(((1, 2), (2, 4)), 4, 4, 2, 2, 2, 4), "losses.hidden_cosine")
    assert not term.compares((1, 2)) and term.compares((2, 4))
    hs, ht = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    (value,) = term.pair_losses({"pairs": ((2, 4),), "hidden": [hs]}, {"hidden": [ht]}, mask)
    cos = torch.nn.functional.cosine_similarity(hs, ht, dim=-1)
    expected = ((1 - cos) * mask).sum() / mask.sum()
    assert float(value) == pytest.approx(float(expected), rel=1e-5)


def test_corpus_terms_equal_the_formulas_written_out_on_the_whole_models():
    """mlm_kd + hidden_cosine + attention_kl through dskd's module (chunked vocabulary, captured
    Q/K, no masked-LM head on unmasked tokens) equal the same objective written with
    transformers alone (full logits, eager attention probabilities), value and gradients."""
    import torch.nn.functional as F

    from dskd import models
    from dskd.config import ArchConfig, StudentConfig
    from dskd.data.corpus import BlockMasker
    from dskd.losses import LayerGeometry, build_loss_terms
    from dskd.models.capture import QKCapture
    from dskd.teacher.online import TeacherSide
    from dskd.training.module import DistillationModule, losses_on

    arch = ArchConfig(layers=4, hidden=32, heads=4, intermediate=64, dropout=0.0)
    teacher = models.build_from_arch(arch, 30522, 0, 0, 0, "teacher.arch", "AutoModelForMaskedLM")
    teacher.config._attn_implementation = "eager"
    pairs = ((1, 2), (2, 4))
    student, _ = models.build_student(StudentConfig(teacher_layers=[2, 4]), teacher, 0, 0, 0)
    teacher = models.freeze(teacher, torch.float32, torch.device("cpu"))
    tok, batch = _blocks(n=4, length=24)
    batch = BlockMasker(tok, 0.3, seed=1)(batch, epoch=0)
    spec = {"mlm_kd": {"weight": 1.0, "temperature": 2.0, "hard_weight": 0.5, "chunk": 7},
            "hidden_cosine": {"weight": 1.0, "layers": "all"}, "attention_kl": {"weight": 1.0}}
    geometry = LayerGeometry(pairs, 32, 32, 4, 4, 2, 4)
    terms = build_loss_terms(spec, geometry)
    needs = frozenset().union(*(t.needs for t in terms.values()))
    module = DistillationModule(student, terms, needs, QKCapture(student, [1, 2], "student"))
    side = TeacherSide(teacher, QKCapture(teacher, [2, 4], "teacher"))
    class Engine:  # what losses_on needs of a DeepSpeed engine: the module, and calling it
        def __init__(self, inner):
            self.module = inner

        def __call__(self, *args):
            return self.module(*args)

    total, _ = losses_on(Engine(module), side, batch, dict.fromkeys(spec, 1.0), pairs)
    grads = torch.autograd.grad(total, list(student.parameters()), allow_unused=True)

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    masked, real = batch["labels"] != -100, batch["attention_mask"].float()
    with torch.no_grad():
        t = teacher(**inputs, output_hidden_states=True, output_attentions=True)
    s = student(**inputs, output_hidden_states=True, output_attentions=True)
    zs, zt = s.logits[masked], t.logits[masked]
    want = 4.0 * F.kl_div(F.log_softmax(zs / 2, -1), F.log_softmax(zt / 2, -1), reduction="batchmean",
                          log_target=True) + 0.5 * F.cross_entropy(zs, batch["labels"][masked])
    for k, (si, ti) in enumerate(pairs):
        cos = F.cosine_similarity(s.hidden_states[si], t.hidden_states[ti], dim=-1)
        want = want + ((1 - cos) * real).sum() / real.sum()
        a_s, a_t = s.attentions[k], t.attentions[ti - 1]
        kl = (a_t * (a_t.clamp_min(1e-12).log() - a_s.clamp_min(1e-12).log())).sum(-1)
        want = want + (kl.mean(1) * real).sum() / real.sum()
    want_grads = torch.autograd.grad(want, list(student.parameters()), allow_unused=True)
    assert float(total) == pytest.approx(float(want), rel=1e-5)
    for got, ref in zip(grads, want_grads, strict=True):
        if ref is None:
            assert got is None or float(got.abs().max()) == 0.0
        else:
            assert torch.allclose(got, ref, atol=1e-5, rtol=1e-3)


# ------------------------------------------------------------------ config checks


@pytest.mark.parametrize("overrides, message", [
    ({"data.task": "sst2"}, "`data.task` is a key of GLUE jobs"),
    ({"data.train_limit": 10}, "`data.train_limit` is a key of GLUE jobs"),
    ({"data.corpus.held_out": 0}, "data.corpus.held_out"),
    ({"data.corpus.files": []}, "data.corpus.files"),
    ({"data.corpus.dataset": "wikitext"}, "sets both `files` and `dataset`"),
    ({"data.corpus.mask_probability": 1.5}, "data.corpus.mask_probability"),
    ({"teacher.cache": "x"}, "`teacher.cache` serves GLUE jobs only"),
    ({"student.init": "somewhere"}, "`student.layers` cannot be combined with `student.init`"),
    ({"training.warmup_steps": -1}, "training.warmup_steps"),
    ({"schedule": [{"name": "a", "steps": 2}], "training.max_steps": 5}, "`training.max_steps` sets the length"),
])
def test_corpus_config_mistakes_are_named(tmp_path, overrides, message):
    with pytest.raises(DskdError, match=message.replace("(", r"\(").replace("`", "`")):
        load_experiment(_config(tmp_path, **overrides))


def _refused(tmp_path, session_tmp, cfg, command="distill"):
    out = tmp_path / "out"
    proc = run_dskd([command, "--config", cfg, "--output", out], session_tmp)
    assert proc.returncode != 0
    assert not out.exists(), "a refused job must not write its output folder"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dskd: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_a_corpus_file_that_is_not_utf8_is_named_and_nothing_is_written(tmp_path, session_tmp):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 50)
    line = _refused(tmp_path, session_tmp, _config(tmp_path, **{"data.corpus.files": [str(bad)]}))
    assert str(bad) in line and "is not UTF-8 (byte 3)" in line


def test_a_hub_corpus_offline_says_offline(tmp_path, session_tmp):
    cfg = _config(tmp_path, **{"data.corpus.files": [], "data.corpus.dataset": "wikitext",
                               "data.corpus.dataset_config": "wikitext-2-raw-v1"})
    line = _refused(tmp_path, session_tmp, cfg)  # the test environment sets HF_HUB_OFFLINE=1
    assert "`data.corpus.dataset`: could not load 'wikitext'" in line and "offline" in line


def test_streamed_corpus_gives_the_blocks_of_the_in_memory_one(tmp_path, monkeypatch):
    import datasets

    from dskd.config import CorpusConfig
    from dskd.data.corpus import load_corpus

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    tok = _tokenizer()
    runs = {}
    for streaming in (False, True):
        fingerprints = {}
        train, held = load_corpus(CorpusConfig(files=["pkg://corpus-sample"], streaming=streaming, held_out=0.1),
                                  tok, 48, fingerprints)
        runs[streaming] = (train["input_ids"], held["input_ids"], train["idx"], fingerprints)
    assert runs[False][0] == runs[True][0] and runs[False][1] == runs[True][1] and runs[False][2] == runs[True][2]
    assert runs[False][3] == runs[True][3] and runs[False][3]["train"]["examples"] == len(runs[False][0])


def test_masked_lm_kd_from_a_teacher_without_a_head_is_refused_by_name(tmp_path, session_tmp):
    from transformers import BertConfig, BertModel

    teacher = tmp_path / "bare-teacher"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(teacher)
    _tokenizer().save_pretrained(teacher)
    cfg = _config(tmp_path, **{"teacher.path": str(teacher), "teacher.arch": None})
    line = _refused(tmp_path, session_tmp, cfg)
    assert "`losses.mlm_kd`" in line and "no masked-LM head" in line


def test_block_length_beyond_the_teachers_positions_is_refused(tmp_path, session_tmp):
    cfg = _config(tmp_path, **{"data.max_length": 600})
    assert "`data.max_length` is 600, but the teacher has 512 positions" in _refused(tmp_path, session_tmp, cfg)


@pytest.mark.parametrize("command", [["evaluate", "--model", "."], ["cache-teacher", "--output", "x"],
                                     ["augment", "--output", "x"], ["train-probes", "--output", "x"]])
def test_glue_commands_refuse_a_corpus_config(tmp_path, command, capsys):
    from dskd.cli import main

    assert main([command[0], "--config", _config(tmp_path), *command[1:]]) != 0
    assert f"is a corpus job (data.corpus); `dskd {command[0]}`" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_masked_lm_terms_in_a_glue_job_and_finetune_on_a_corpus_are_refused(tmp_path, session_tmp):
    from conftest import write_config

    glue = write_config(tmp_path / "glue.yaml", {"losses": {"mlm_ce": {"weight": 1.0}}})
    assert "`losses.mlm_ce` is a masked-LM term of corpus jobs" in _refused(tmp_path, session_tmp, glue)
    assert "`dskd finetune` trains a teacher on a labelled task" in _refused(tmp_path, session_tmp,
                                                                           _config(tmp_path), "finetune")


def test_max_steps_and_warmup_steps_set_the_schedule():
    from dskd.config import TrainingConfig
    from dskd.training.stages import lr_factor, plan_stages

    training = TrainingConfig(epochs=5, max_steps=40, warmup_steps=4)
    stages = plan_stages([], {"mlm_kd": {"weight": 1.0}}, training, steps_per_epoch=7)
    assert stages[-1].end == 40
    assert [lr_factor(s, stages, training) for s in (0, 2, 4, 22, 40)] == [0.0, 0.5, 1.0, 0.5, 0.0]


def test_plan_of_a_corpus_job_counts_blocks_steps_and_what_a_cache_would_take(tmp_path, monkeypatch):
    import datasets

    from dskd.commands.plan import format_plan, make_plan

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    plan = make_plan(load_experiment(_config(tmp_path)), "ds_configs/zero2_fp32.json", world=2)
    corpus = plan["corpus"]
    assert corpus["train_blocks"] == 96 and corpus["global_batch_blocks"] == 16
    assert corpus["steps_per_epoch"] == 6 and corpus["steps"] == 6 and corpus["tokens_per_step"] == 16 * 32
    # One mapped pair (student 1 <-> teacher 2), hidden 64, 32 tokens per block, float32.
    assert plan["cache"]["bytes_per_block"]["hidden_states"] == 1 * 32 * 64 * 4
    assert plan["memory_per_rank"]["student_bytes"]["gradients"] == plan["memory_per_rank"]["student_params"] * 4 // 2
    assert "not used by corpus jobs" in format_plan(plan)


def test_model_flops_per_token_by_hand(monkeypatch):
    from types import SimpleNamespace

    from transformers import BertConfig, BertForMaskedLM

    from dskd.data import CorpusTask
    from dskd.training import throughput

    def bert(layers):
        return BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=layers,
                                          num_attention_heads=2, intermediate_size=16, max_position_embeddings=32))

    student, teacher = bert(1), bert(2)

    def non_embedding(model):
        return sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)

    job = SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(max_length=16)), model=student,
                          teacher=SimpleNamespace(model=teacher), task=CorpusTask(True, 0.15))
    expected = (6 * non_embedding(student) + 12 * 1 * 8 * 16 + 2 * non_embedding(teacher) + 4 * 2 * 8 * 16
                + 0.15 * (6 * 100 * 8 + 2 * 100 * 8))
    assert throughput.flops_per_token(job) == pytest.approx(expected)
    monkeypatch.setenv("DSKD_PEAK_TFLOPS", "2")
    out = throughput.scalars(1000.0, 1e9, torch.device("cpu"), torch.float32)
    assert out["train/model_tflops"] == pytest.approx(1.0) and out["train/mfu"] == pytest.approx(0.5)
    monkeypatch.delenv("DSKD_PEAK_TFLOPS")
    assert "train/mfu" not in throughput.scalars(1000.0, 1e9, torch.device("cpu"), torch.float32)


# ------------------------------------------------------------------ real runs


def test_corpus_run_resumes_mid_stream_exactly_and_its_export_starts_a_task_stage(tmp_path, session_tmp):
    cfg = _config(tmp_path)
    full, cut = tmp_path / "full", tmp_path / "cut"
    _ok(run_dskd(["distill", "--config", cfg, "--output", full], session_tmp))
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["task"] == "corpus" and 0 <= metrics["mlm_accuracy"] <= 1
    # The teacher's held-out masked-LM CE: a random tiny BERT predicts nearly uniformly over 30,522 words.
    assert metrics["teacher"]["mlm_ce"] == pytest.approx(math.log(30522), abs=0.1)
    assert {"loss/mlm_kd", "loss/hidden_cosine", "loss/attention_kl"} <= set(metrics)
    assert metrics["loss"] == pytest.approx(sum(metrics[f"loss/{t}"] for t in ("mlm_kd", "hidden_cosine",
                                                                                  "attention_kl")))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(full / "tensorboard"))
    board.Reload()
    tags = board.Tags()["scalars"]
    assert {"train/tokens_per_s", "train/model_tflops", "eval/mlm_accuracy", "eval/loss/mlm_kd"} <= set(tags)
    assert all(e.value > 0 for e in board.Scalars("train/tokens_per_s"))
    _ok(run_dskd(["distill", "--config", cfg, "--output", cut, "--set", "training.halt_after_steps=6"], session_tmp))
    _ok(run_dskd(["distill", "--config", cfg, "--output", cut, "--resume"], session_tmp))
    assert_same_run(full, cut)

    from transformers import AutoModelForMaskedLM

    general = AutoModelForMaskedLM.from_pretrained(full / "model")
    assert json.loads((full / "run.json").read_text())["model_class"] == "AutoModelForMaskedLM"
    # Stage 2: a GLUE job whose student starts from the corpus run; its encoder is the export's.
    from conftest import write_config

    task_cfg = write_config(tmp_path / "task.yaml", {
        "student": {"init": str(full), "init_from_teacher": True},
        "teacher": {"arch": {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128},
                    "tokenizer": "pkg://bert-base-uncased", "random_ok": True},
        "training.halt_after_steps": 1, "training.save_every": 1, "training.lr": 1e-12,
    })
    task = tmp_path / "task"
    _ok(run_dskd(["distill", "--config", task_cfg, "--output", task], session_tmp))
    from dskd.training.checkpoint import consolidated_state_dict

    state = consolidated_state_dict(task / "checkpoints", "step00000001", 0)
    word = "bert.embeddings.word_embeddings.weight"
    assert torch.allclose(state[f"model.{word}"].float(), general.state_dict()[word], atol=1e-6)


def test_kroneckerbert_general_student_hands_over_to_the_task_stage(tmp_path, session_tmp):
    """KroneckerBERT's two stages: a factored bare encoder distilled on the corpus, exported, then
    loaded as a factored sequence classifier by the task stage (`student.init`)."""
    from transformers import AutoModel

    import dskd.models.kronecker  # noqa: F401  (registers the model types)

    cfg = _config(tmp_path, **{"student.kronecker": {"attention": [2, 2], "embeddings": [2, 2]},
                               "losses": {"hidden_cosine": {"weight": 1.0}, "attention_kl": {"weight": 1.0}}})
    general = tmp_path / "general"
    proc = _ok(run_dskd(["distill", "--config", cfg, "--output", general], session_tmp))
    assert "[student] KroneckerBERT (attention B=[2, 2], embeddings B=[2, 2]" in proc.stderr
    model = AutoModel.from_pretrained(general / "model")
    assert type(model).__name__ == "KroneckerBertModel"
    from conftest import write_config

    task_cfg = write_config(tmp_path / "task.yaml", {"student": {"init": str(general)},
                                                     "training.halt_after_steps": 2})
    proc = _ok(run_dskd(["distill", "--config", task_cfg, "--output", tmp_path / "task"], session_tmp))
    info = json.loads((tmp_path / "task" / "model_config" / "config.json").read_text())
    assert info["model_type"] == "kronecker_bert" and info["architectures"][0].startswith("KroneckerBert")
    # Masked-LM students keep their embeddings dense: the head's projection is the same table.
    mlm = _config(tmp_path, "mlm.yaml", **{"student.kronecker": {"embeddings": [2, 2]}})
    assert "`student.kronecker.embeddings` factors the word-embedding table" in _refused(tmp_path, session_tmp, mlm)


def test_codir_pre_training_form_draws_negatives_from_other_blocks(tmp_path, session_tmp):
    losses = {"codir": {"weight": 1.0, "negatives": "random", "pool": "mean", "k": 8}}
    out = tmp_path / "codir"
    _ok(run_dskd(["distill", "--config", _config(tmp_path, losses=losses), "--output", out, "--set",
                  "training.epochs=0.5"], session_tmp))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["loss/codir"] > 0 and metrics["neg_loss"] == -metrics["loss/codir"]
    labelled = _config(tmp_path, "labelled.yaml", losses={"codir": {"weight": 1.0}})
    assert "`losses.codir.negatives: label` draws negatives with another label" in _refused(tmp_path, session_tmp,
                                                                                          labelled)


@pytest.mark.slow
def test_corpus_run_on_two_ranks_zero2_zero3_and_bf16_agree(tmp_path, session_tmp):
    """ZeRO-3 partitions the tied vocabulary projection the masked-LM terms read outside its
    module (registered as an external parameter): both stages must train the same weights."""
    from safetensors.torch import load_file

    cfg = _config(tmp_path)
    weights = {}
    for ds in ("zero2_fp32", "zero3_fp32"):
        out = tmp_path / ds
        _ok(run_dskd(["distill", "--config", cfg, "--output", out, "--deepspeed", f"ds_configs/{ds}.json"],
                     session_tmp, nproc=2))
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["step"] == 96 // (2 * 8) and metrics["loss/mlm_kd"] > 0
        weights[ds] = load_file(str(out / "model" / "model.safetensors"))
    a, b = weights["zero2_fp32"], weights["zero3_fp32"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=2e-5), key
    # bf16 under ZeRO-3: the vocabulary kernel computes in fp32 and hands bf16 gradients back.
    out = tmp_path / "zero3_bf16"
    _ok(run_dskd(["distill", "--config", cfg, "--output", out, "--deepspeed", "ds_configs/zero3_bf16.json"],
                 session_tmp, nproc=2))
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "run.json").read_text())["dtype"] == "bfloat16"
    assert abs(metrics["loss/mlm_kd"] - json.loads((tmp_path / "zero2_fp32" / "metrics.json").read_text())[
        "loss/mlm_kd"]) < 0.1
