"""Exports are ready to deploy: every kind (a fine-tuned teacher, a distilled student, a RoBERTa
model whose vocabulary came as bare vocab.json + merges.txt, a general-distillation encoder)
loads with ``transformers.pipeline`` and truncates a text longer than its positions; labels are
the task's names; the tokenizer keeps no per-call or machine-local state; the model card holds
exactly the run's metrics and says when a checkpoint is not the final model; files are
readable as the umask allows."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import yaml
from conftest import BERT_VOCAB, REPO, SHARED_DATA, dskd_env, require_shared, write_config

# The tests on `runs` share four real (tiny) runs made in one process: about a minute in all.
slow = pytest.mark.slow

ROBERTA_VOCAB = SHARED_DATA / "vocab" / "roberta-base"
LONG_TEXT = "a long and winding sentence about a film " * 120  # ~1000 tokens: past 512 positions
TINY_RUN = {"data.train_limit": 32, "data.dev_limit": 16, "training.epochs": 1, "finetune.epochs": 1,
            "training.eval_every": 1, "training.save_every": 1, "finetune.save_every": 1}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture(scope="module")
def runs(session_tmp):
    """Four tiny runs, made in one process (imports paid once): 2 optimizer steps each, a
    checkpoint and an evaluation at every step."""
    require_shared("vocab", "roberta-base")
    root = session_tmp / "export-runs"
    root.mkdir()
    vocab = root / "roberta-vocab"  # what a user downloads by hand: no tokenizer_config.json, no config.json
    vocab.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ROBERTA_VOCAB / name, vocab / name)
    glue = write_config(root / "glue.yaml", TINY_RUN)
    roberta = write_config(root / "roberta.yaml", {**TINY_RUN, "teacher.tokenizer": str(vocab), "teacher.arch": {
        "layers": 1, "hidden": 32, "heads": 2, "intermediate": 64, "model_type": "roberta"}})
    corpus_cfg = yaml.safe_load((REPO / "configs" / "general" / "tiny.yaml").read_text())
    corpus_cfg["data"].update(max_length=32)
    corpus_cfg["data"]["corpus"].update(held_out=0.1, max_blocks=16)
    corpus_cfg["training"].update(batch_size=8)
    corpus = root / "corpus.yaml"
    corpus.write_text(yaml.safe_dump(corpus_cfg))
    out = {name: root / name for name in ("teacher", "student", "roberta", "corpus")}
    cases = [["teacher", ["finetune", "--config", glue, "--output", out["teacher"]]],
             ["student", ["distill", "--config", glue, "--output", out["student"], "--set",
                          f"teacher.path={out['teacher']}"]],
             ["roberta", ["finetune", "--config", roberta, "--output", out["roberta"]]],
             ["corpus", ["distill", "--config", corpus, "--output", out["corpus"]]]]
    cases = [[name, [str(a) for a in argv]] for name, argv in cases]
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "cli_batch.py")], cwd=REPO,
                          env=dskd_env(session_tmp), input=json.dumps({"cases": cases, "watch": str(vocab)}),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, _ in cases:
        assert results[name]["code"] == 0, f"{name}: {results[name]['stderr'][-3000:]}"
    return out


@slow
@pytest.mark.parametrize("kind", ["teacher", "student", "roberta"])
def test_every_task_export_serves_a_pipeline_with_the_task_labels_and_truncates(runs, kind):
    from transformers import AutoTokenizer, pipeline

    folder = runs[kind] / "model"
    classify = pipeline("text-classification", model=str(folder))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer(LONG_TEXT)["input_ids"]) > 600
    # RoBERTa: 514 position rows, the first two taken by its padding offset.
    assert tokenizer.model_max_length == 512 and classify.model.config.max_position_embeddings == (
        514 if kind == "roberta" else 512)
    for text in (LONG_TEXT, "a fine film"):
        scores = classify(text, truncation=True, top_k=None)
        assert {s["label"] for s in scores} == {"negative", "positive"}
        assert sum(s["score"] for s in scores) == pytest.approx(1.0, abs=1e-6)
    assert classify.model.config.label2id == {"negative": 0, "positive": 1}
    card = (folder / "README.md").read_text()
    assert "0 = `negative`, 1 = `positive`" in card and "truncates at the model's 512 positions" in card


@slow
def test_a_general_distillation_export_has_no_labels_and_loads_for_features(runs):
    from transformers import AutoModel, AutoTokenizer, pipeline

    folder = runs["corpus"] / "model"
    assert json.loads((folder / "config.json").read_text())["id2label"] == {}  # a corpus job has no classes
    assert AutoModel.from_pretrained(folder).config.num_labels == 0
    features = pipeline("feature-extraction", model=str(folder))
    vectors = features(LONG_TEXT, truncation=True)
    assert len(vectors[0]) == AutoTokenizer.from_pretrained(folder).model_max_length == 512
    card = (folder / "README.md").read_text()
    assert _front_matter(card)["pipeline_tag"] == "fill-mask" and "model-index" not in _front_matter(card)
    metrics = json.loads((runs["corpus"] / "metrics.json").read_text())
    assert f"| mlm_accuracy | {metrics['mlm_accuracy']!r} |" in card


@slow
def test_tokenizer_config_keeps_no_per_call_or_local_state(runs):
    for kind in ("teacher", "student", "roberta", "corpus"):
        folder = runs[kind] / "model"
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert not {"max_length", "stride", "truncation_strategy", "local_files_only", "is_local", "name_or_path",
                    "_name_or_path"} & set(config), kind
        assert config["model_max_length"] == 512, kind
        backend = json.loads((folder / "tokenizer.json").read_text())
        assert backend["truncation"] is None and backend["padding"] is None, kind
        for name in ("config.json", "tokenizer_config.json"):
            assert str(runs[kind].parent) not in (folder / name).read_text(), (kind, name)


@slow
def test_model_card_holds_the_runs_metrics_teacher_loss_terms_and_command(runs):
    student = runs["student"]
    metrics = json.loads((student / "metrics.json").read_text())
    card = (student / "model" / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["pipeline_tag"] == "text-classification" and "dskd" in meta["tags"]
    [result] = meta["model-index"][0]["results"]
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"accuracy": metrics["accuracy"]}
    assert f"| accuracy | {metrics['accuracy']!r} |" in card
    assert f"at step {metrics['step']} (checkpoint `step{metrics['step']:08d}`)" in card
    assert "Not the final model" not in card
    # The teacher: its path and the dev metrics the run measured of it.
    assert f"`{runs['teacher']}`" in card and f"| accuracy | {metrics['teacher']['accuracy']!r} |" in card
    assert "| hard_ce | hard_ce | 0.5 | - |" in card and "| soft_kd | soft_kd | 0.5 | temperature: 2.0 |" in card
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(student / "model")
    assert f"| parameters | {sum(p.numel() for p in model.parameters()):,} |" in card
    assert "| layers | 1 |" in card and "| hidden size | 32 |" in card
    command = json.loads((student / "run.json").read_text())["command"]
    assert command[:2] == ["dskd", "distill"]
    assert " ".join(command) in card
    import dskd

    assert f"dskd {dskd.__version__}" in card
    # A fine-tuned teacher's card names where it started and its own metrics.
    teacher_card = (runs["teacher"] / "model" / "README.md").read_text()
    assert "## Starting point" in teacher_card and "## Teacher" not in teacher_card
    accuracy = json.loads((runs["teacher"] / "metrics.json").read_text())["accuracy"]
    assert f"| accuracy | {accuracy!r} |" in teacher_card


@slow
def test_a_mid_run_checkpoint_export_says_it_is_not_final_and_shows_its_own_evaluation(runs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dskd.training.export import export_run

    out = export_run(runs["student"], tmp_path / "step1", tag="step00000001")
    card = (out / "README.md").read_text()
    assert "**Not the final model.** This is checkpoint `step00000001` (step 1)" in card
    assert "status is `completed` and whose final model is from step 2" in card
    board = EventAccumulator(str(runs["student"] / "tensorboard"))
    board.Reload()
    at_step_1 = {e.step: e.value for e in board.Scalars("eval/accuracy")}[1]
    value = {m["type"]: m["value"] for m in _front_matter(card)["model-index"][0]["results"][0]["metrics"]}
    assert value["accuracy"] == pytest.approx(at_step_1)  # tensorboard stores float32
    assert "the evaluation this checkpoint recorded" in card
    final = export_run(runs["student"], tmp_path / "final")
    assert "Not the final model" not in (final / "README.md").read_text()


@slow
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_exported_files_follow_the_umask(runs, tmp_path, umask):
    from dskd.training.export import export_run

    old = os.umask(umask)
    try:
        out = export_run(runs["student"], tmp_path / "nested" / "export")
    finally:
        os.umask(old)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    # The run's own model/ (written by the run under the default umask 022) is readable too.
    assert stat.S_IMODE((runs["student"] / "model" / "model.safetensors").stat().st_mode) & 0o044 == 0o044


@pytest.mark.parametrize("task, pair, names", [
    ("mrpc", True, ["not_equivalent", "equivalent"]),
    ("rte", True, ["entailment", "not_entailment"]),
    ("mnli", True, ["entailment", "neutral", "contradiction"]),
    ("stsb", True, ["similarity"]),
])
def test_class_names_follow_the_hub_glue_label_ids(tmp_path, task, pair, names):
    """id2label in label-id order, the order the data reader gives labels (RTE's TSV 'entailment'
    is 0, as on the hub); STS-B's one output is a score, returned as is (no sigmoid)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertTokenizerFast, pipeline

    from dskd.data import get_task, glue
    from dskd.training.export import name_classes, save_tokenizer

    spec = get_task(task)
    assert list(spec.class_names) == names
    if spec.label_names is not None:  # the reader's label ids are positions in label_names
        assert [glue._parse_label(spec, value, "test") for value in spec.label_names] == list(range(len(names)))
    config = AutoConfig.for_model("bert", vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64, num_labels=spec.num_labels)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    name_classes(model.config, spec)
    model.save_pretrained(tmp_path / "model")
    BertTokenizerFast(vocab=str(BERT_VOCAB)).save_pretrained(tmp_path / "vocab")
    save_tokenizer(tmp_path / "vocab", tmp_path / "model", 64)
    classify = pipeline("text-classification", model=str(tmp_path / "model"))
    scores = classify({"text": "one two " * 50, "text_pair": "three"}, truncation=True, top_k=None)
    assert sorted(s["label"] for s in scores) == sorted(names)
    if spec.is_regression:
        with torch.no_grad():
            inputs = classify.tokenizer("one two " * 50, "three", truncation=True, return_tensors="pt")
            assert scores[0]["score"] == pytest.approx(model.eval()(**inputs).logits.item(), abs=1e-5)
    else:
        assert sum(s["score"] for s in scores) == pytest.approx(1.0, abs=1e-6)
