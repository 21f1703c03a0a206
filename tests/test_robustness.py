"""`dskd robustness`: the evaluation sets (IMDb, AdvGLUE, files with label maps) and the table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import BERT_VOCAB, REPO, SHARED_DATA, SHARED_GLUE
from conftest import needs_shared as _needs_shared
from dskd.data.robustness import EvalSet, read_eval_set, shipped_sets, subsample
from dskd.data.tasks import get_task
from dskd.errors import DskdError

ROBUSTNESS = SHARED_DATA / "robustness"
needs_shared = _needs_shared("robustness")


@needs_shared
def test_imdb_is_read_without_html_breaks_and_subsampled_at_random_with_a_seed():
    sst2 = get_task("sst2")
    imdb = {s.name: s for s in shipped_sets(sst2, ROBUSTNESS)}["imdb"]
    columns = read_eval_set(imdb, sst2)
    assert len(columns["label"]) == 25_000 and sorted(set(columns["label"])) == [0, 1]
    assert columns["label"][:12_500] == [0] * 12_500  # the file lists negatives first: a prefix would be one class
    assert not any("<br" in text.lower() for text in columns["text_a"])
    a, b = subsample(columns, 200, seed=3), subsample(columns, 200, seed=3)
    assert a == b and len(a["label"]) == 200 and a["idx"] == list(range(200))
    assert 60 < sum(a["label"]) < 140  # both classes, as a random draw gives
    assert subsample(columns, 200, seed=4)["text_a"] != a["text_a"]


@needs_shared
def test_advglue_rte_reads_glue_label_names():
    rte = get_task("rte")
    (advglue,) = shipped_sets(rte, ROBUSTNESS)
    columns = read_eval_set(advglue, rte)
    assert len(columns["label"]) == 81 and set(columns["label"]) == {0, 1} and len(columns["text_b"]) == 81


def test_a_label_map_maps_a_files_labels_and_an_unmapped_label_is_named(tmp_path):
    sst2 = get_task("sst2")
    path = tmp_path / "reviews.tsv"
    path.write_text("sentence\tlabel\ngreat film\tpos\nawful <br />film\tneg\n")
    spec = EvalSet("reviews", "out-of-domain", path, {"pos": "positive", "neg": "0"}, clean_html=True)
    assert read_eval_set(spec, sst2) == {"text_a": ["great film", "awful film"], "label": [1, 0], "idx": [0, 1]}
    with pytest.raises(DskdError, match=r"reviews.tsv:2: label 'pos' of evaluation set 'reviews' is not a SST-2 label"
                                        r".*--label-map reviews:pos="):
        read_eval_set(EvalSet("reviews", "out-of-domain", path), sst2)
    path.write_text("sentence\tlabel\ngreat film\tpos\nmeh\tmixed\n")
    with pytest.raises(DskdError, match=r"reviews.tsv:3: label 'mixed' .* is not in its label map \(neg, pos\)"):
        read_eval_set(spec, sst2)
    with pytest.raises(DskdError, match=r"label map target 'good' is not a SST-2 label"):
        read_eval_set(EvalSet("reviews", "out-of-domain", path, {"pos": "good"}), sst2)
    with pytest.raises(DskdError, match=r"has no column\(s\) sentence"):
        path.write_text("text\tlabel\nx\t1\n")
        read_eval_set(spec, sst2)


def _tiny_model_folder(folder, vocab_size=None, seed=0):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    tokenizer = BertTokenizerFast(vocab=str(BERT_VOCAB))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@needs_shared
def test_the_table_equals_the_models_own_predictions(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dskd.cli import main
    from dskd.data.robustness import read_eval_set

    model_dir = _tiny_model_folder(tmp_path / "tiny")
    out = tmp_path / "report"
    code = main(["robustness", "--models", str(model_dir), "--config", str(REPO / "configs" / "tiny.yaml"),
                 "--set", f"data.path={SHARED_GLUE}", "--data-root", str(ROBUSTNESS), "--output", str(out),
                 "--max-examples", "40", "--seed", "5", "--max-length", "32"])
    assert code == 0
    table = json.loads((out / "robustness.json").read_text())
    assert [s["name"] for s in table["sets"]] == ["dev", "imdb", "advglue"]
    assert [s["examples"] for s in table["sets"]] == [40, 40, 40]
    # By hand: the same subsample, tokenised at 32 tokens, through the model.
    sst2 = get_task("sst2")
    model, tokenizer = AutoModelForSequenceClassification.from_pretrained(model_dir).eval(), \
        AutoTokenizer.from_pretrained(model_dir)
    for spec in shipped_sets(sst2, ROBUSTNESS):
        columns = subsample(read_eval_set(spec, sst2), 40, 5)
        with torch.no_grad():
            logits = model(**tokenizer(columns["text_a"], truncation=True, max_length=32, padding=True,
                                       return_tensors="pt")).logits
        accuracy = float((logits.argmax(-1).numpy() == np.array(columns["label"])).mean())
        assert table["models"][0]["sets"][spec.name]["accuracy"] == pytest.approx(accuracy)
        assert table["models"][0]["predicted"][spec.name] == logits.argmax(-1).tolist()
        assert table["labels"][spec.name] == columns["label"]
    markdown = (out / "robustness.md").read_text()
    dev = table["models"][0]["sets"]["dev"]["accuracy"]
    imdb = table["models"][0]["sets"]["imdb"]["accuracy"]
    assert f"| tiny | {100 * dev:.1f} | {100 * imdb:.1f} ({100 * (imdb - dev):+.1f}) |" in markdown


def test_a_model_whose_vocabulary_does_not_fit_its_tokenizer_is_refused(tmp_path):
    from dskd.commands.robustness import load_model

    folder = _tiny_model_folder(tmp_path / "small", vocab_size=1000)
    with pytest.raises(DskdError, match=r"tokenizer has 30522 tokens but the model's embedding table 1000 rows"):
        load_model(str(folder), get_task("sst2"))


def test_unknown_sets_and_maps_are_named(tmp_path):
    from dskd.commands.robustness import build_sets, parse_named

    sst2 = get_task("sst2")
    with pytest.raises(DskdError, match=r"--sets squad: not a set of task sst2 \(sets: dev, imdb, advglue"):
        build_sets(sst2, tmp_path / "dev.tsv", tmp_path, ["squad"], {}, {})
    with pytest.raises(DskdError, match=r"--label-map nope: no evaluation set of that name"):
        build_sets(sst2, tmp_path / "dev.tsv", tmp_path, None, {}, {"nope": "a=b"})
    with pytest.raises(DskdError, match=r"--eval-file 'x': expected NAME=PATH"):
        parse_named(["x"], "--eval-file")
    sets = build_sets(sst2, tmp_path / "dev.tsv", tmp_path, None, {"mine": "m.tsv"}, {"mine": "p=positive"})
    assert [(s.name, s.kind) for s in sets][-1] == ("mine", "out-of-domain") and sets[-1].label_map == {"p": "positive"}


@needs_shared
def test_attacks_on_each_model_are_recorded_and_their_adversarial_examples_really_flip_it(tmp_path):
    from dskd.cli import main
    from dskd.commands.attacks import AttackResult, summarize
    from dskd.commands.robustness import load_model, predictor

    model_dir = _tiny_model_folder(tmp_path / "tiny")
    out = tmp_path / "report"
    args = ["robustness", "--models", str(model_dir), "--config", str(REPO / "configs" / "tiny.yaml"),
            "--set", f"data.path={SHARED_GLUE}", "--data-root", str(ROBUSTNESS), "--output", str(out),
            "--sets", "dev", "--max-length", "32", "--attacks", "word", "char", "--attack-examples", "6",
            "--max-queries", "60", "--max-words", "0.3"]
    assert main(args) == 0
    table = json.loads((out / "robustness.json").read_text())
    _, model, tokenizer = load_model(str(model_dir), get_task("sst2"))
    predict = predictor(model, tokenizer, 32, 8)
    for kind in ("word", "char"):
        records = [json.loads(line) for line in (out / "attacks" / f"tiny-{kind}.jsonl").read_text().splitlines()]
        results = [AttackResult(**{**r, "original": tuple(r["original"]), "perturbed": tuple(r["perturbed"]),
                                   "edits": [tuple(e) for e in r["edits"]]}) for r in records]
        assert len(results) == 6 and table["models"][0]["attacks"][kind] == summarize(results)
        for r in results:
            assert r.queries <= 60 and r.words_changed <= max(1, int(0.3 * r.words_total))
            assert int(predict([r.perturbed]).argmax()) == r.adv_pred  # re-scored: what was recorded is real
            assert r.succeeded == (r.clean_pred == r.label and r.adv_pred != r.label)
    first = (out / "attacks" / "tiny-char.jsonl").read_text()
    assert main(args) == 0 and (out / "attacks" / "tiny-char.jsonl").read_text() == first  # same seed, same examples


@needs_shared
def test_compare_to_gives_each_models_paired_difference_per_set_and_attack(tmp_path, capsys):
    from dskd.cli import main
    from dskd.data.significance import paired_bootstrap

    a, b = _tiny_model_folder(tmp_path / "a"), _tiny_model_folder(tmp_path / "b", seed=1)
    out = tmp_path / "report"
    common = ["robustness", "--config", str(REPO / "configs" / "tiny.yaml"), "--set", f"data.path={SHARED_GLUE}",
              "--data-root", str(ROBUSTNESS), "--output", str(out), "--sets", "dev", "advglue", "--max-examples", "40",
              "--max-length", "32", "--attacks", "char", "--attack-examples", "5", "--max-queries", "30"]
    assert main([*common, "--models", str(a), str(b), "--compare-to", "a"]) == 0
    table = json.loads((out / "robustness.json").read_text())
    ref, other = table["models"]
    assert table["compare_to"] == "a" and "compare" not in ref and list(other["compare"]) == ["dev", "advglue",
                                                                                               "char attack"]
    for name in ("dev", "advglue"):
        want = paired_bootstrap("accuracy", [other["predicted"][name]], [ref["predicted"][name]], table["labels"][name])
        assert other["compare"][name] == want
        assert want["diff"] == pytest.approx(other["sets"][name]["accuracy"] - ref["sets"][name]["accuracy"])
    after = other["compare"]["char attack"]
    assert after["diff"] == pytest.approx(other["attacks"]["char"]["adversarial_accuracy"]
                                          - ref["attacks"]["char"]["adversarial_accuracy"])
    dev = other["compare"]["dev"]
    assert f"| b | {100 * dev['diff']:+.1f}" in (out / "robustness.md").read_text()
    capsys.readouterr()
    assert main([*common, "--models", str(a), "--compare-to", "zzz"]) == 2
    assert "--compare-to zzz is not one of --models" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--max-queries", "0", r"--max-queries must be at least 1"),
    ("--max-words", "0", r"--max-words must be a share of the words in \(0, 1\]"),
    ("--attack-examples", "0", r"--attack-examples must be at least 1"),
    ("--mlm", "/no/such/mlm", r"--mlm points to /no/such/mlm, which does not exist"),
])
def test_bad_attack_settings_are_one_line(tmp_path, capsys, flag, value, message):
    import re

    from dskd.cli import main

    code = main(["robustness", "--models", str(tmp_path / "m"), "--config", str(REPO / "configs" / "tiny.yaml"),
                 "--output", str(tmp_path / "out"), "--attacks", "word", flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "out").exists()


@needs_shared
def test_an_interrupted_table_keeps_the_models_it_finished(tmp_path, capsys):
    from dskd.cli import main

    a = _tiny_model_folder(tmp_path / "a")
    out = tmp_path / "report"
    common = ["robustness", "--config", str(REPO / "configs" / "tiny.yaml"), "--set", f"data.path={SHARED_GLUE}",
              "--data-root", str(ROBUSTNESS), "--output", str(out), "--sets", "dev", "advglue", "--max-examples", "30"]
    assert main([*common, "--models", str(a), str(tmp_path / "b")]) == 2  # b is missing: stops after a
    assert json.loads((out / "robustness.partial.json").read_text())["models"][0]["path"] == str(a)
    capsys.readouterr()
    b = _tiny_model_folder(tmp_path / "b")
    assert main([*common, "--models", str(a), str(b)]) == 0
    assert f"[robustness] {a}: kept from {out / 'robustness.partial.json'} (same settings)" in capsys.readouterr().err
    table = json.loads((out / "robustness.json").read_text())
    assert [r["model"] for r in table["models"]] == ["a", "b"] and not (out / "robustness.partial.json").exists()
    assert table["models"][0]["sets"] == table["models"][1]["sets"]  # the same weights (seed 0) score the same
    # An interrupted table of other settings (here another seed) is not reused.
    assert main([*common, "--models", str(a), str(tmp_path / "c"), "--seed", "1"]) == 2
    capsys.readouterr()
    assert main([*common, "--models", str(a), "--seed", "2"]) == 0
    assert "kept from" not in capsys.readouterr().err
    # A finished table of the same settings keeps its models too: extending it scores only the new one.
    assert main([*common, "--models", str(a), str(b), "--seed", "2"]) == 0
    assert f"[robustness] {a}: kept from {out / 'robustness.json'} (same settings)" in capsys.readouterr().err
    extended = json.loads((out / "robustness.json").read_text())
    assert [r["model"] for r in extended["models"]] == ["a", "b"] and extended["models"][0]["sets"] == \
        extended["models"][1]["sets"]


@needs_shared
def test_a_run_folders_results_also_go_to_its_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dskd.cli import main

    run = tmp_path / "run"
    _tiny_model_folder(run / "model")
    (run / "tensorboard").mkdir()
    (run / "run.json").write_text(json.dumps({"status": "completed"}))
    (run / "metrics.json").write_text(json.dumps({"task": "sst2", "accuracy": 0.5, "step": 7}))
    out = tmp_path / "report"
    assert main(["robustness", "--models", str(run), "--config", str(REPO / "configs" / "tiny.yaml"),
                 "--set", f"data.path={SHARED_GLUE}", "--data-root", str(ROBUSTNESS), "--output", str(out),
                 "--sets", "dev", "advglue", "--max-examples", "20", "--attacks", "char", "--attack-examples", "3",
                 "--max-queries", "30"]) == 0
    table = json.loads((out / "robustness.json").read_text())["models"][0]
    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    got = {tag: [(e.step, e.value) for e in board.Scalars(tag)] for tag in board.Tags()["scalars"]}
    assert got["robustness/advglue/accuracy"] == [(7, pytest.approx(table["sets"]["advglue"]["accuracy"]))]
    assert got["robustness/char_attack/attack_success_rate"] == [
        (7, pytest.approx(table["attacks"]["char"]["attack_success_rate"]))]


@needs_shared
@pytest.mark.slow
def test_two_ranks_share_the_work_and_write_the_one_rank_table(tmp_path):
    from conftest import run_dskd

    from dskd.cli import main

    model_dir = _tiny_model_folder(tmp_path / "tiny")
    common = ["robustness", "--models", str(model_dir), "--config", str(REPO / "configs" / "tiny.yaml"),
              "--set", f"data.path={SHARED_GLUE}", "--data-root", str(ROBUSTNESS), "--sets", "dev", "advglue",
              "--max-examples", "40", "--max-length", "32", "--attacks", "char", "--attack-examples", "7",
              "--max-queries", "40"]
    assert main([*common, "--output", str(tmp_path / "one")]) == 0
    proc = run_dskd([*common, "--output", tmp_path / "two"], tmp_path, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stderr
    one, two = (json.loads((tmp_path / d / "robustness.json").read_text()) for d in ("one", "two"))
    assert one == two
    assert (tmp_path / "one" / "attacks" / "tiny-char.jsonl").read_text() == \
        (tmp_path / "two" / "attacks" / "tiny-char.jsonl").read_text()
    assert proc.stdout.count("sst2: accuracy") == 1  # rank 0 prints the table once
