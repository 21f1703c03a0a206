"""Encoder families beyond BERT/RoBERTa: ELECTRA, ALBERT, DistilBERT, DeBERTa-v2 as teachers and
students (tiny models built from config), the attention terms where Q/K reproduce the family's
attention, refusals where they do not, and tokenizers from bare vocabulary files."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SHARED_DATA, dskd_env, needs_shared, write_config
from dskd import models
from dskd.config import ArchConfig, StudentConfig, TeacherConfig
from dskd.errors import DskdError
from dskd.models import families
from dskd.models.capture import QKCapture, forward_with_layers

VOCAB = SHARED_DATA / "vocab"
FAMILIES = ["bert", "roberta", "electra", "albert", "distilbert", "deberta-v2"]
# What the model's own layers are named, to check copying per family.
LAYER_PREFIX = {"electra": "electra.encoder.layer.", "distilbert": "distilbert.transformer.layer.",
                "deberta-v2": "deberta.encoder.layer.", "bert": "bert.encoder.layer.",
                "roberta": "roberta.encoder.layer."}
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def tiny(model_type, layers=4, seed=0, **arch):
    embedding = {"embedding_size": 16} if model_type in ("albert", "electra") else {}
    config = ArchConfig(layers=layers, hidden=32, heads=4, intermediate=64, model_type=model_type, max_position=64,
                        dropout=0.0, **{**embedding, **arch})
    return models.build_from_arch(config, vocab_size=120, num_labels=2, pad_token_id=0, seed=seed, key="teacher.arch")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(5, 120, (2, 6), generator=g), "attention_mask": MASK,
            "token_type_ids": torch.zeros(2, 6, dtype=torch.long)}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_student_copies_the_chosen_teacher_layers_and_hidden_states_have_one_entry_per_layer(model_type):
    teacher = tiny(model_type).eval()
    student, layers = models.build_student(StudentConfig(teacher_layers=[2, 4]), teacher, 2, 0, 0)
    assert layers == [2, 4] and student.config.num_hidden_layers == 2 and type(student) is type(teacher)
    t, s = teacher.state_dict(), student.state_dict()
    prefix = LAYER_PREFIX.get(model_type)
    for key, value in s.items():
        source = key
        if prefix and key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            source = f"{prefix}{layers[int(index)] - 1}.{rest}"
        assert torch.equal(value, t[source]), key  # layers, embeddings (and their projection), pooler, head
    # Hidden-state capture: embeddings + one state per layer, [B, S, hidden], whatever the
    # embedding width (ALBERT and ELECTRA embed at 16 and project to 32); DistilBERT takes no token_type_ids.
    needs = frozenset({"logits", "hidden", "cls", "mean", "embeddings", "cls_all"})
    out = forward_with_layers(student, _inputs(), needs, None, [1, 2])
    assert [tuple(h.shape) for h in out["hidden"]] == [(2, 6, 32)] * 2
    assert [tuple(c.shape) for c in out["cls"]] == [(2, 32)] * 2 and len(out["cls_all"]) == 2
    assert tuple(out["embeddings"].shape) == (2, 6, 32) and tuple(out["logits"].shape) == (2, 2)
    assert all(torch.isfinite(v).all() for v in (*out["hidden"], *out["mean"], out["logits"]))
    t_out = forward_with_layers(teacher, _inputs(), needs, None, [1, 2, 3, 4])
    assert len(t_out["cls_all"]) == 4 and torch.equal(t_out["cls"][3], t_out["hidden"][3][:, 0])
    if model_type == "albert":
        # One shared group: a 2-layer copy is the teacher's first two repetitions, exactly.
        for k in range(2):
            torch.testing.assert_close(out["hidden"][k], t_out["hidden"][k], rtol=0, atol=1e-6)


def test_albert_keeps_a_narrow_embedding_and_refuses_copying_several_groups():
    teacher = tiny("albert")
    assert teacher.config.embedding_size == 16 and teacher.config.hidden_size == 32
    grouped = tiny("albert")
    grouped.config.num_hidden_groups = 2
    with pytest.raises(DskdError, match=r"num_hidden_groups=2.*`student.init_from_teacher: false`"):
        models.build_student(StudentConfig(layers=2), grouped, 2, 0, 0)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_student_of_another_family_reads_the_same_batch(model_type):
    """A BERT teacher and a student of any family built from `student.arch` (DistilBERT's forward
    takes no token_type_ids; they are left out for it only)."""
    teacher = tiny("bert")
    embedding = 16 if model_type in ("albert", "electra") else None
    cfg = StudentConfig(init_from_teacher=False, arch=ArchConfig(layers=2, hidden=24, heads=2, intermediate=48,
                                                                 model_type=model_type, embedding_size=embedding))
    student, layers = models.build_student(cfg, teacher, 2, 0, 3)
    assert layers == [] and student.config.model_type == model_type and student.config.hidden_size == 24
    out = forward_with_layers(student, _inputs(), frozenset({"logits", "cls"}), None, [2])
    assert tuple(out["cls"][0].shape) == (2, 24)
    taken = {"input_ids", "attention_mask"} | (set() if model_type == "distilbert" else {"token_type_ids"})
    assert set(models.model_inputs(_inputs(), student)) == taken


@pytest.mark.parametrize("model_type", ["electra", "albert", "distilbert", "deberta-v2"])
def test_kronecker_students_of_other_families_are_refused_with_the_fix(model_type):
    from dskd.models.kronecker import kroneckerize

    with pytest.raises(DskdError, match=rf"`student.kronecker` supports BERT and RoBERTa students; this student is "
                                        rf"'{model_type}': drop `student.kronecker`, or distil into a BERT"):
        kroneckerize(tiny(model_type, layers=2), {"attention": [2, 2]})


def _eager_twin(model):
    twin = type(model)(model.config.__class__.from_dict(model.config.to_dict()))
    twin.load_state_dict(model.state_dict())
    twin.config._attn_implementation = "eager"
    return twin.eval()


ATTENTION_FAMILIES = ["bert", "roberta", "electra", "albert", "distilbert", "xlm-roberta", "camembert"]


@pytest.mark.parametrize("model_type", ATTENTION_FAMILIES + ["albert-2-groups"])
def test_captured_qk_reproduce_the_familys_own_attention(model_type):
    """softmax(Q Kᵀ/√d + mask) from the hooked projections equals the attention probabilities the
    family's eager code returns (output_attentions=True), layer by layer, to 1e-5."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from dskd.losses import attention_log_probs

    if model_type in ("xlm-roberta", "camembert", "albert-2-groups"):
        kind = "albert" if model_type == "albert-2-groups" else model_type
        extra = {"num_hidden_groups": 2, "embedding_size": 16} if kind == "albert" else {}
        config = AutoConfig.for_model(kind, vocab_size=120, hidden_size=32, num_hidden_layers=4,
                                      num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
                                      pad_token_id=1, num_labels=2, **extra)
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config).eval()
    else:
        model = tiny(model_type).eval()
    eager = _eager_twin(model)
    inputs = _inputs(1)
    capture = QKCapture(model, [1, 2, 3, 4], "student")
    out = forward_with_layers(model, inputs, frozenset({"attention_qk"}), capture, [1, 2, 3, 4])
    attentions = eager(**models.model_inputs(inputs, eager), output_attentions=True).attentions
    assert len(attentions) == 4
    real = MASK.bool()[:, None, :, None]  # real query rows
    for layer, (q, k) in enumerate(out["attention_qk"]):
        probs = attention_log_probs(q, k, MASK.bool()).exp()
        torch.testing.assert_close(torch.where(real, probs, 0), torch.where(real, attentions[layer], 0),
                                   rtol=0, atol=1e-5)
    if model_type.startswith("albert"):  # the shared module's calls were told apart, not overwritten
        assert not torch.equal(out["attention_qk"][0][0], out["attention_qk"][3][0])


def test_deberta_attention_terms_are_refused_by_term_family_and_alternative():
    model = tiny("deberta-v2")
    assert model.config.relative_attention and model.config.pos_att_type == ["p2c", "c2p"]
    with pytest.raises(DskdError, match=r"`losses.attention_kl` recompute attention .* the student is deberta-v2, "
                                        r"which uses disentangled attention .*hidden_cosine, tinybert_hidden"):
        families.check_attention(model.config, "student", ["losses.attention_kl"])
    with pytest.raises(DskdError, match="the teacher is deberta-v2"):
        QKCapture(model, [1], "teacher")


def test_arch_model_type_lists_the_families_and_embedding_size_is_checked(tmp_path):
    from dskd.config import load_config

    cfg = write_config(tmp_path / "a.yaml", {"teacher.arch.model_type": "xlnet"})
    with pytest.raises(DskdError, match=r"`teacher.arch.model_type` must be 'bert' or 'roberta' or 'electra' or "
                                        r"'albert' or 'distilbert' or 'deberta-v2', got 'xlnet'"):
        load_config(cfg)
    cfg = write_config(tmp_path / "b.yaml", {"teacher.arch.embedding_size": 16})
    with pytest.raises(DskdError, match=r"`teacher.arch.embedding_size` is for ALBERT and ELECTRA.*a bert embeds"):
        load_config(cfg)


# ------------------------------------------------------------------ tokenizers from bare files


@needs_shared("vocab")
def test_tokenizers_from_bare_vocabulary_files(tmp_path):
    """spiece.model (ALBERT), vocab.txt (BERT WordPiece), vocab.json + merges.txt (RoBERTa BPE):
    folders without tokenizer_config.json, or the file itself."""
    roberta = tmp_path / "roberta"
    roberta.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(VOCAB / "roberta-base" / name, roberta / name)
    renamed = tmp_path / "albert.model"
    shutil.copy(VOCAB / "albert-base-v2" / "spiece.model", renamed)
    cases = {
        VOCAB / "albert-base-v2": ("AlbertTokenizer", 30000, [2, 10975, 126, 3]),
        VOCAB / "albert-base-v2" / "spiece.model": ("AlbertTokenizer", 30000, [2, 10975, 126, 3]),
        renamed: ("AlbertTokenizer", 30000, [2, 10975, 126, 3]),
        VOCAB / "bert-base-uncased": ("BertTokenizer", 30522, [101, 7592, 2088, 102]),
        roberta: ("RobertaTokenizer", 50265, [0, 31414, 232, 2]),
    }
    for source, (cls, size, ids) in cases.items():
        tok = models.load_tokenizer(TeacherConfig(tokenizer=str(source)))
        assert (type(tok).__name__, len(tok), tok("Hello world")["input_ids"]) == (cls, size, ids), source
        assert tok.padding_side == "right" and tok.pad_token_id is not None


@needs_shared("vocab", "albert-base-v2")
def test_tokenizer_errors_are_ours_and_true(tmp_path, monkeypatch):
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DskdError, match=r"holds no tokenizer: .*vocab.txt: WordPiece; vocab.json \+ merges.txt.*"
                                        r"It holds: notes.md"):
        models.load_tokenizer(TeacherConfig(tokenizer=str(tmp_path)))
    # transformers blames a missing sentencepiece for any folder it cannot build from; ours names the files.
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(DskdError) as info:
        models.load_tokenizer(TeacherConfig(tokenizer=str(tmp_path)))
    message = str(info.value)
    assert "need to have sentencepiece" not in message and "found no file to build a tokenizer from" in message
    # A config naming a class without its vocabulary gives transformers a tokenizer of special tokens only.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    with pytest.raises(DskdError, match=r"has no vocabulary \(5 tokens, all special\): its vocabulary file is missing"):
        models.load_tokenizer(TeacherConfig(tokenizer=str(tmp_path)))
    # Only when sentencepiece really is missing does the message say so.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sentencepiece" else real(name, *a))
    with pytest.raises(DskdError, match=r"spiece.model is a sentencepiece model.*`sentencepiece` package, which is "
                                        r"not installed: pip install sentencepiece"):
        models.load_tokenizer(TeacherConfig(tokenizer=str(VOCAB / "albert-base-v2")))


# ------------------------------------------------------------------ real runs, every family

ATTENTION_TERMS = {"attention_kl": {"weight": 1.0}, "minilm": {"weight": 0.5},
                   "tinybert_attention": {"weight": 0.1}}
STATE_TERMS = {"hard_ce": {"weight": 0.5}, "soft_kd": {"weight": 0.5, "temperature": 2.0},
               "cls_cosine": {"weight": 1.0}, "hidden_cosine": {"weight": 1.0, "layers": "all"},
               "tinybert_hidden": {"weight": 0.1, "embeddings": True}, "pkd": {"weight": 1.0}}


def _family_config(tmp_path, name, model_type, losses, tokenizer="pkg://bert-base-uncased", student=None):
    arch = {"layers": 4, "hidden": 32, "heads": 2, "intermediate": 64, "model_type": model_type}
    if model_type in ("albert", "electra"):
        arch["embedding_size"] = 16
    return write_config(tmp_path / f"{name}.yaml", {
        "data.train_limit": 32, "data.dev_limit": 16, "data.max_length": 24,
        "teacher.arch": arch, "teacher.tokenizer": tokenizer,
        "student": student or {"init_from_teacher": True, "teacher_layers": [2, 4]},
        "losses": losses, "training.epochs": 1, "finetune.epochs": 1, "training.batch_size": 8,
        "finetune.batch_size": 8, "training.attention_images": 1,
    })


@pytest.mark.slow
@needs_shared("vocab", "albert-base-v2")
def test_every_family_finetunes_and_distils_with_every_term_it_supports(tmp_path):
    """Real `dskd finetune` + `dskd distill` for each family (one process, as tests/cli_batch.py
    runs commands): the state and logit terms everywhere, the attention terms where Q/K reproduce
    the family's attention; DeBERTa's attention terms refused by name; a BERT teacher with a
    DistilBERT student; ALBERT with its own sentencepiece vocabulary."""
    cases = []
    for model_type in FAMILIES:
        losses = dict(STATE_TERMS, **({} if model_type == "deberta-v2" else ATTENTION_TERMS))
        tokenizer = str(VOCAB / "albert-base-v2") if model_type == "albert" else "pkg://bert-base-uncased"
        cfg = _family_config(tmp_path, model_type, model_type, losses, tokenizer)
        teacher = tmp_path / f"{model_type}-teacher"
        cases += [[f"{model_type}/finetune", ["finetune", "--config", str(cfg), "--output", str(teacher)]],
                  [f"{model_type}/distill", ["distill", "--config", str(cfg), "--output", str(tmp_path / model_type),
                                             "--set", f"teacher.path={teacher}"]]]
    refused = _family_config(tmp_path, "refused", "deberta-v2", dict(STATE_TERMS, attention_kl={"weight": 1.0}))
    cases.append(["deberta-v2/attention", ["distill", "--config", str(refused), "--output", str(tmp_path / "refused"),
                                           "--set", f"teacher.path={tmp_path / 'deberta-v2-teacher'}"]])
    mixed = _family_config(tmp_path, "mixed", "bert", dict(STATE_TERMS, **ATTENTION_TERMS), student={
        "init_from_teacher": False, "arch": {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64,
                                             "model_type": "distilbert"}})
    cases.append(["bert->distilbert", ["distill", "--config", str(mixed), "--output", str(tmp_path / "mixed"),
                                       "--set", f"teacher.path={tmp_path / 'bert-teacher'}",
                                       "--set", "layer_map=[2,4]"]])
    # `student.init`: an ALBERT student started from the distilled ALBERT run's model.
    albert = tmp_path / "albert.yaml"
    cases.append(["albert/init", ["distill", "--config", str(albert), "--output", str(tmp_path / "albert-init"),
                                  "--set", f"teacher.path={tmp_path / 'albert-teacher'}", "--set",
                                  "student={init: " + str(tmp_path / "albert") + "}", "--set", "layer_map=[2,4]"]])
    # A DistilBERT teacher served from the teacher cache (its config names its width `dim`).
    cached = _family_config(tmp_path, "cached", "distilbert", {"hard_ce": {"weight": 0.5}, "soft_kd": {"weight": 0.5},
                                                               "cls_cosine": {"weight": 1.0},
                                                               "attention_kl": {"weight": 1.0}})
    teacher = f"teacher.path={tmp_path / 'distilbert-teacher'}"
    cases += [["distilbert/cache", ["cache-teacher", "--config", str(cached), "--output", str(tmp_path / "cache"),
                                    "--set", teacher]],
              ["distilbert/cached", ["distill", "--config", str(cached), "--output", str(tmp_path / "cached"),
                                     "--set", teacher, "--set", f"teacher.cache={tmp_path / 'cache'}"]]]
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "cli_batch.py")], cwd=REPO, env=dskd_env(tmp_path),
                          input=json.dumps({"cases": cases, "watch": str(tmp_path / "none")}), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        if name == "deberta-v2/attention":
            assert result["code"] == 2, result
            assert "`losses.attention_kl` recompute attention" in result["stderr"]
            assert "deberta-v2, which uses disentangled attention" in result["stderr"]
            assert not (tmp_path / "refused").exists()
            continue
        assert result["code"] == 0, (name, result["stderr"][-3000:])
    from test_e2e import _scalars

    for run, family in [*((m, m) for m in FAMILIES), ("mixed", "distilbert"), ("albert-init", "albert")]:
        scalars = _scalars(tmp_path / run / "tensorboard")
        terms = set(STATE_TERMS) | (set() if family == "deberta-v2" else set(ATTENTION_TERMS))
        for term in terms:
            values = [v for _, v in scalars[f"train/loss/{term}"]]
            assert values and all(math.isfinite(v) for v in values), (run, term, values)
        assert all(math.isfinite(v) for _, v in scalars["train/loss/total"])
        run_info = json.loads((tmp_path / run / "run.json").read_text())
        assert run_info["status"] == "completed"
        config = json.loads((tmp_path / run / "model" / "config.json").read_text())
        assert config["model_type"] == family
        assert config.get("num_hidden_layers", config.get("n_layers")) == 2
    cached = _scalars(tmp_path / "cached" / "tensorboard")
    assert all(math.isfinite(v) for term in ("cls_cosine", "attention_kl") for _, v in cached[f"train/loss/{term}"])
