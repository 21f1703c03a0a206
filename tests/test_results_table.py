"""bench/results.py collects finished runs into the docs/results.md table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from argparse import Namespace

from conftest import REPO


def _results_module():
    spec = importlib.util.spec_from_file_location("results_bench", REPO / "bench" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_run(folder, metrics, status="completed"):
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"status": status}))
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_table_reports_mean_and_spread_over_completed_seeds_only(tmp_path):
    results = _results_module()
    _fake_run(results.teacher_dir(tmp_path, "rte"), {"accuracy": 0.6})
    for seed, acc in ((1, 0.55), (2, 0.57), (3, 0.59)):
        _fake_run(results.student_dir(tmp_path, "rte", 3, "soft_kd", seed), {"accuracy": acc})
    _fake_run(results.student_dir(tmp_path, "rte", 3, "internal_sid", 1), {"accuracy": 0.58})
    _fake_run(results.student_dir(tmp_path, "rte", 3, "internal_sid", 2), {"accuracy": 0.9}, status="halted")
    args = Namespace(root=tmp_path, tasks=["rte"], layers=[3], seeds=[1, 2, 3])
    table = results.collect(args)
    assert len(table["rte"]["rows"]["L3/soft_kd"]) == 3 and len(table["rte"]["rows"]["L3/internal_sid"]) == 1
    text = results.markdown(table, [3])
    assert "| teacher (6 layers, fine-tuned MiniLM) | - | | 60.0 |  |" in text
    assert "| 3 layers | soft-label KD | student fine-tuned without a teacher | 57.0 ± 2.0 (n=3) | - |" in text
    assert "| 3 layers | internal KD, SID | soft-label KD | 58.0 (n=1) | - |" in text  # no predictions kept: no test
    assert "| 3 layers | student fine-tuned without a teacher |" not in text  # rows without runs are left out


def _predictions(folder, predicted, labels):
    folder.joinpath("dev_predictions.jsonl").write_text("".join(
        json.dumps({"row": i, "label": y, "predicted": p, "output": [0.0, 0.0]}) + "\n"
        for i, (p, y) in enumerate(zip(predicted, labels))))


def _fake_runs_with_predictions(results, root, rows, labels, rng):
    """SST-2 runs under ``root``: per method, (share right, seeds); each seed's predictions get the
    gold label with that probability. Returns each method's kept predictions, seed by seed."""
    import numpy as np

    kept = {}
    for method, (right, seeds) in rows.items():
        kept[method] = []
        for seed in seeds:
            predicted = [y if rng.random() < right else 1 - y for y in labels]
            folder = results.student_dir(root, "sst2", 3, method, seed)
            _fake_run(folder, {"accuracy": float(np.mean(np.array(predicted) == labels))})
            _predictions(folder, predicted, labels)
            kept[method].append(predicted)
    return kept


def test_cells_carry_the_paired_bootstrap_against_their_reference_row(tmp_path):
    import numpy as np

    from dskd.data.significance import holm, paired_bootstrap

    results = _results_module()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300).tolist()
    _fake_run(results.teacher_dir(tmp_path, "sst2"), {"accuracy": 0.9})
    runs = _fake_runs_with_predictions(results, tmp_path, {m: (right, (1, 2, 3)) for m, right in (
        ("no_teacher", 0.70), ("soft_kd", 0.72), ("internal_sid", 0.85), ("soft_kd@full", 0.73))}, labels, rng)
    _fake_run(results.teacher_dir(tmp_path, "sst2", "full"), {"accuracy": 0.93})
    table = results.collect(Namespace(root=tmp_path, tasks=["sst2"], layers=[3], seeds=[1, 2, 3]))
    compare = table["sst2"]["compare"]
    assert set(compare) == {"L3/soft_kd", "L3/internal_sid", "L3/soft_kd@full"}
    assert compare["L3/soft_kd"]["reference"] == "L3/no_teacher" and compare["L3/soft_kd@full"]["reference"] == "L3/soft_kd"
    want = paired_bootstrap("accuracy", runs["internal_sid"], runs["soft_kd"], labels)
    assert {k: compare["L3/internal_sid"][k] for k in want} == want
    assert want["p"] < 0.05 and want["diff"] > 0.1
    text = results.markdown(table, [3])
    line = next(x for x in text.splitlines() if "internal KD, SID" in x)
    # Holm over the column's three tests: the SID gap stays significant (†) when they are counted together.
    family = list(compare.values())
    assert [c["p_holm"] for c in family] == holm([c["p"] for c in family])
    assert compare["L3/internal_sid"]["p_holm"] < 0.05
    assert f"{100 * want['diff']:+.1f}*† [{100 * want['low']:+.1f}, {100 * want['high']:+.1f}]" in line
    # Significant alone but not once the family is counted: only the plain mark.
    assert results._delta({"diff": 0.02, "low": 0.001, "high": 0.04, "p": 0.03, "p_holm": 0.09}) == "+2.0* [+0.1, +4.0] p=0.03"
    assert results._delta({"diff": -0.01, "low": -0.03, "high": 0.01, "p": 0.4, "p_holm": 1.0}) == "-1.0 [-3.0, +1.0] p=0.4"
    assert "| teacher on all training rows | - | | 93.0 |" in text
    # A table without its students (--rows of the core rows) leaves the stronger teacher out.
    table["sst2"]["rows"].pop("L3/soft_kd@full")
    assert "teacher on all training rows" not in results.markdown(table, [3])
    assert "soft-label KD (teacher fine-tuned on all training rows) | soft-label KD |" in text
    assert results.student_dir(tmp_path, "sst2", 3, "soft_kd@full+unlabeled", 2).name == "L3-soft_kd@full+unlabeled-s2"
    assert results.reference("soft_kd@full+unlabeled") == "soft_kd@full" and results.reference("no_teacher") is None
    assert results.reference("codir_general") == "codir" and "general_init" in results.table_rows()
    # no_teacher@all: every row with its label, as many steps as @full+unlabeled; compared with the 8,000-row run.
    assert results.reference("no_teacher@all") == "no_teacher" and results.reference("soft_kd@full") == "soft_kd"
    grid = sys.modules["results_grid"]
    extra = grid.method_inputs(Namespace(root=tmp_path), "sst2", "no_teacher", "all", tmp_path / "teacher")
    assert extra == ["data.train_limit=null", "training.epochs=1", "training.save_every=200"]


def test_noise_table_reuses_the_clean_rows_at_rate_zero_and_leaves_missing_cells_empty(tmp_path):
    spec = importlib.util.spec_from_file_location("noise_bench", REPO / "bench" / "noise.py")
    noise = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(noise)
    clean, noisy = tmp_path / "results", tmp_path / "noise"
    args = Namespace(root=noisy, results_root=clean, tasks=["sst2"], rates=[0.0, 0.2],
                     methods=["no_teacher", "soft_kd", "small_loss"])
    # Rate 0: the clean table's teacher, no-teacher and soft-KD runs; mitigations have their own.
    _fake_run(clean / "sst2" / "teacher", {"accuracy": 0.85})
    _fake_run(clean / "sst2" / "L3-no_teacher-s1", {"accuracy": 0.83})
    _fake_run(clean / "sst2" / "L3-soft_kd-s1", {"accuracy": 0.836})
    _fake_run(noisy / "sst2" / "r00" / "L3-small_loss-s1", {"accuracy": 0.837})
    _fake_run(noisy / "sst2" / "r20" / "teacher", {"accuracy": 0.815})
    _fake_run(noisy / "sst2" / "r20" / "L3-no_teacher-s1", {"accuracy": 0.778})
    _fake_run(noisy / "sst2" / "r20" / "L3-soft_kd-s1", {"accuracy": 0.5}, status="halted")  # not counted
    assert noise.student_for(args, "sst2", 0.0, "soft_kd") == clean / "sst2" / "L3-soft_kd-s1"
    assert noise.student_for(args, "sst2", 0.2, "soft_kd") == noisy / "sst2" / "r20" / "L3-soft_kd-s1"
    text = noise.markdown(noise.collect(args), args.rates)
    assert "| teacher (fine-tuned on the noisy labels) | 85.0 | 81.5 |" in text
    assert "| 3 layers, no KD (CE on the noisy labels alone) | 83.0 | 77.8 |" in text
    assert "| 3 layers, KD (0.5 CE + 0.5 KD) | 83.6 | - |" in text
    assert "| 3 layers, mitigation 2: small-loss selection (drop <= 20%) | 83.7 | - |" in text


def test_cost_table_gives_each_row_its_own_teachers_share_and_the_median_wall_minutes(tmp_path):
    results = _results_module()
    _fake_run(results.teacher_dir(tmp_path, "sst2"), {"accuracy": 0.80})
    _fake_run(results.teacher_dir(tmp_path, "sst2", "full"), {"accuracy": 0.90})
    for seed, (acc, minutes) in enumerate(((0.70, 4), (0.74, 5), (0.78, 9)), start=1):
        for name in ("soft_kd", "soft_kd@full"):
            folder = results.student_dir(tmp_path, "sst2", 3, name, seed)
            _fake_run(folder, {"accuracy": acc})
            # A run resumed once (its launches are summed), one of them paused for 2 minutes (not counted).
            folder.joinpath("wall.json").write_text(json.dumps({"seconds": [60.0 * minutes - 30, 30.0 + 120 * (seed == 2)],
                                                                "paused_seconds": 120 * (seed == 2)}))
    table = results.collect(Namespace(root=tmp_path, tasks=["sst2"], layers=[3], seeds=[1, 2, 3]))
    text = results.cost_markdown(table, [3])
    # Mean 0.74: 92.5% of the 0.80 teacher; the @full row against the 0.90 teacher: 82.2%.
    assert "| 3 layers | soft-label KD | 92.5 | 5.0 |" in text
    assert "| 3 layers | soft-label KD (teacher fine-tuned on all training rows) | 82.2 | 5.0 |" in text


def test_compare_root_tests_each_row_against_the_same_row_of_another_grid(tmp_path):
    import numpy as np
    import pytest

    from dskd.data.significance import holm, paired_bootstrap, pooled_paired_bootstrap

    results = _results_module()
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200).tolist()
    here, there = tmp_path / "grouped", tmp_path / "plain"
    kept = {}
    for root, seeds in ((here, (1, 2, 3)), (there, (1,))):
        _fake_run(results.teacher_dir(root, "sst2"), {"accuracy": 0.85})
        made = _fake_runs_with_predictions(results, root, {m: (0.8, seeds) for m in ("soft_kd", "minilm")}, labels, rng)
        kept.update({(root, m): predicted for m, predicted in made.items()})
    _fake_run(results.student_dir(here, "sst2", 3, "tinybert", 1), {"accuracy": 0.8})  # only here: no row
    args = Namespace(root=here, tasks=["sst2"], layers=[3], seeds=[1, 2, 3])
    result = results.compare_roots(args, results.collect_with_predictions(args, here), there)
    assert list(result["sst2"]) == ["L3/soft_kd", "L3/minilm", results.POOLED]
    want = paired_bootstrap("accuracy", kept[here, "soft_kd"], kept[there, "soft_kd"], labels)
    assert {k: result["sst2"]["L3/soft_kd"][k] for k in want} == want
    assert (result["sst2"]["L3/soft_kd"]["n"], result["sst2"]["L3/soft_kd"]["n_other"]) == (3, 1)
    # The pooled line: the mean of the rows' differences, on examples drawn once for both rows.
    pooled = pooled_paired_bootstrap("accuracy", [(kept[here, m], kept[there, m]) for m in ("soft_kd", "minilm")],
                                     labels)
    assert {k: result["sst2"][results.POOLED][k] for k in pooled} == pooled
    assert pooled["diff"] == pytest.approx((want["diff"] + result["sst2"]["L3/minilm"]["diff"]) / 2)
    # The rows form one Holm family; the pooled line is a test of its own, outside it.
    rows = [result["sst2"][r] for r in ("L3/soft_kd", "L3/minilm")]
    assert [r["p_holm"] for r in rows] == holm([r["p"] for r in rows]) and "p_holm" not in result["sst2"][results.POOLED]
    text = results.compare_roots_markdown(result, there)
    assert f"| sst2 | 3 layers, soft-label KD | 3 / 1 | {100 * want['diff']:+.1f}" in text
    assert f"| sst2 | mean over the 2 rows above | - | {100 * pooled['diff']:+.1f}" in text
    nothing = results.compare_roots(args, results.collect_with_predictions(args, here), tmp_path / "empty")
    assert nothing == {} and results.compare_roots_markdown(nothing, tmp_path / "empty").startswith(
        f"No row has completed runs with dev predictions both here and under {tmp_path / 'empty'}")


def test_pairs_test_two_rows_against_each_other_and_refuse_a_row_that_is_not_one(tmp_path):
    import argparse

    import numpy as np
    import pytest

    from dskd.data.significance import paired_bootstrap

    results = _results_module()
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 600).tolist()
    _fake_run(results.teacher_dir(tmp_path, "sst2"), {"accuracy": 0.9})
    kept = _fake_runs_with_predictions(results, tmp_path, {"internal_all": (0.7, (1, 2, 3)),
                                                           "internal_pid": (0.9, (1, 2)), "codir": (0.8, (1,))},
                                       labels, rng)
    args = Namespace(root=tmp_path, tasks=["sst2"], layers=[3], seeds=[1, 2, 3])
    pairs = [results.pair_arg("internal_pid:internal_all"), results.pair_arg("minilm:internal_all")]
    result = results.compare_pairs(args, results.collect_with_predictions(args, tmp_path), pairs)
    # MiniLM has no runs: its pair is left out; the other is the bootstrap of the two rows' seeds.
    assert [(s["row"], s["other"], s["n"], s["n_other"]) for s in result["sst2"]] == [
        ("L3/internal_pid", "L3/internal_all", 2, 3)]
    want = paired_bootstrap("accuracy", kept["internal_pid"], kept["internal_all"], labels)
    assert {k: result["sst2"][0][k] for k in want} == want and want["diff"] > 0.1 and want["p"] < 0.05
    assert result["sst2"][0]["p_holm"] == want["p"]  # a family of one test: nothing to adjust
    text = results.pairs_markdown(result)
    assert (f"| sst2 | 3 layers, internal KD, PID | internal KD, all layers | 2 / 3 | {100 * want['diff']:+.1f}*"
            in text)
    for bad in ("internal_pid", "internal_pid:nope", "soft_kd:soft_kd"):
        with pytest.raises(argparse.ArgumentTypeError, match="a pair is ROW:OTHER"):
            results.pair_arg(bad)
    assert results.pairs_markdown({}).startswith("No pair has completed runs")


def test_two_stage_rows_of_bench_general_are_the_folders_the_results_table_collects(tmp_path, monkeypatch):
    """bench/general.py writes the two-stage runs, bench/results.py collects them: one folder each."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("general_bench", REPO / "bench" / "general.py")
    general = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(general)
    results = _results_module()
    for name in results.GENERAL_ROWS:
        assert name in general.ROWS
        assert general.task_dir(tmp_path, "mrpc", name, 2) == results.student_dir(tmp_path, "mrpc", 3, name, 2)
    for name, method in general.FROM_RESULTS.items():  # rows both scripts make: the same run
        assert method in results.METHODS
        assert general.task_dir(tmp_path, "mrpc", name, 3) == results.student_dir(tmp_path, "mrpc", 3, method, 3)
    _fake_run(results.teacher_dir(tmp_path, "mrpc"), {"f1": 0.85})
    for seed, f1 in ((1, 0.80), (2, 0.82)):
        _fake_run(general.task_dir(tmp_path, "mrpc", "general_init", seed), {"f1": f1})
    _fake_run(general.general_dir(tmp_path, "minilm_l3"), {"loss": 0.5, "loss/minilm": 0.2, "step": 274})
    args = Namespace(root=tmp_path, tasks=["mrpc"], layers=[3], seeds=[1, 2, 3])
    text = general.markdown(general.collect(args))
    assert "| stage 1 (init from teacher layers 2, 4, 6), then soft-label KD | 81.0 ± 1.4 (n=2) |" in text
    assert "| minilm_l3 | 274 | 0.5000 | minilm 0.2000 |" in text
    table = results.collect(args)
    assert [r["f1"] for r in table["mrpc"]["rows"]["L3/general_init"]] == [0.80, 0.82]


def test_keep_copies_each_finished_record_and_a_new_checkout_runs_only_what_is_not_kept(tmp_path, monkeypatch):
    """--keep: a run's record outlives its run folder; the grid skips what is kept, refuses a teacher that differs."""
    import sys

    import pytest

    results = _results_module()
    grid = sys.modules["results_grid"]
    launched = []

    def fake_launch(cmd, threads, run=None):  # a distill that completes at once, with an accuracy per seed
        launched.append(cmd[3])
        if cmd[3] == "cache-teacher":
            out = __import__("pathlib").Path(cmd[cmd.index("--output") + 1])
            out.mkdir(parents=True)
            (out / "manifest.json").write_text("{}")
        if cmd[3] == "distill":
            assert f"teacher.cache={grid.teacher_cache_dir(args.root, 'sst2')}" in cmd  # soft_kd reads the shared cache
            out = __import__("pathlib").Path(cmd[cmd.index("--output") + 1])
            _fake_run(out, {"accuracy": (80 + int(out.name[-1])) / 100})
            _predictions(out, [1, 0, 1], [1, 1, 1])

    monkeypatch.setattr(grid, "launch", fake_launch)
    here, keep = tmp_path / "runs", tmp_path / "results"
    _fake_run(results.teacher_dir(here, "sst2"), {"accuracy": 0.85})
    _predictions(results.teacher_dir(here, "sst2"), [1, 1, 1], [1, 1, 1])
    _fake_run(results.student_dir(here, "sst2", 3, "soft_kd", 1), {"accuracy": 0.81})  # finished before --keep
    _predictions(results.student_dir(here, "sst2", 3, "soft_kd", 1), [1, 0, 1], [1, 1, 1])
    args = Namespace(root=here, keep=keep, tasks=["sst2"], layers=[3], seeds=[1, 2], methods=["soft_kd"],
                     student_sets=[], threads=1)
    grid.run_grid(args)
    assert launched == ["cache-teacher", "distill"]  # seed 2 only
    for seed in (1, 2):
        run = results.student_dir(here, "sst2", 3, "soft_kd", seed)
        for name in ("metrics.json", "run.json", "dev_predictions.jsonl"):
            assert (grid.kept(keep, run) / name).read_bytes() == (run / name).read_bytes()
    assert not (grid.kept(keep, results.student_dir(here, "sst2", 3, "soft_kd", 1)) / "model").exists()
    # A new checkout (no runs/): nothing is run again, not even the teacher; the kept records make the table.
    fresh = tmp_path / "fresh"
    args = Namespace(**dict(vars(args), root=fresh))
    grid.run_grid(args)
    assert launched == ["cache-teacher", "distill"] and not fresh.exists()
    table = results.collect(Namespace(root=keep, tasks=["sst2"], layers=[3], seeds=[1, 2]))
    assert [r["accuracy"] for r in table["sst2"]["rows"]["L3/soft_kd"]] == [0.81, 0.82]
    # Seed 3 needs the teacher: one fine-tuned again that predicts otherwise is refused.
    _fake_run(results.teacher_dir(fresh, "sst2"), {"accuracy": 0.85})
    _predictions(results.teacher_dir(fresh, "sst2"), [1, 0, 1], [1, 1, 1])
    args.seeds = [3]
    with pytest.raises(SystemExit, match="made again, this run predicts 1 of 3 dev examples otherwise than the run kept in"):
        grid.run_grid(args)
    assert launched == ["cache-teacher", "distill"]
    _predictions(results.teacher_dir(fresh, "sst2"), [1, 1, 1], [1, 1, 1])  # the same teacher: seed 3 runs
    grid.run_grid(args)
    assert launched == ["cache-teacher", "distill"] * 2
    # A stage-1 student (metrics, no predictions) made again must have the kept one's metrics.
    first, again = tmp_path / "a" / "general" / "minilm_l3", fresh / "general" / "minilm_l3"
    _fake_run(first, {"loss": 0.5735, "step": 274})
    grid.keep_record(keep, first)
    _fake_run(again, {"loss": 0.5736, "step": 274})
    with pytest.raises(SystemExit, match=r"has the metrics \{'loss': 0.5736, 'step': 274\}, not \{'loss': 0.5735"):
        grid.check_remade(keep, again)
    assert grid.completed(grid.kept(keep, results.student_dir(fresh, "sst2", 3, "soft_kd", 3)))


def test_rows_that_read_the_shared_teacher_cache_need_only_what_it_stores():
    """TEACHER_CACHED rows read one cache per task, written with CACHE_RECIPE: each row's terms must be
    servable by it, and the rows left online must be ones the cache cannot serve."""
    import pytest

    import dskd.methods  # noqa: F401  (registers the method terms)
    from dskd.config import load_config
    from dskd.errors import DskdError
    from dskd.losses.needs import spec_for

    import sys

    _results_module()
    grid = sys.modules["results_grid"]
    pairs = ((1, 2), (2, 4), (3, 6))

    def spec(recipe):
        return spec_for(load_config(REPO / recipe, check_paths=False).losses, pairs)

    stored = spec(grid.CACHE_RECIPE)
    assert stored.fields == ("logits", "cls", "attention_qk") and stored.layers == (2, 4, 6)
    for method in grid.TEACHER_CACHED:
        need = spec(f"configs/results/{method}.yaml")
        assert set(need.fields) <= set(stored.fields) and set(need.layers) <= set(stored.layers), method
    for method in ("tinybert", "minilm", "combined_kd"):
        with pytest.raises(DskdError, match="which the teacher cache does not store"):
            spec(f"configs/results/{method}.yaml")


def test_the_docs_tables_are_what_their_kept_records_give_and_rewrite_mends_a_stale_one(tmp_path, monkeypatch):
    """docs/results.md's marked tables are made from results/ by the arguments in their markers."""
    results = _results_module()
    found = results.docs_tables(REPO / "docs" / "results.md")
    assert found, "docs/results.md has no table marked <!-- bench/results.py ARGS -->"
    for args, written, now in found:
        assert written == now, f"docs/results.md's table of `{args}` differs from its records: python bench/results.py --docs docs/results.md"
    # A stale table is rewritten from its records, the text around it untouched.
    root = tmp_path / "kept"
    _fake_run(results.teacher_dir(root, "rte"), {"accuracy": 0.6})
    for seed, acc in ((1, 0.55), (2, 0.57)):
        _fake_run(results.student_dir(root, "rte", 3, "no_teacher", seed), {"accuracy": acc})
    marker = f"<!-- bench/results.py --root {root} --layers 3 --seeds 1 2 --tasks rte -->"
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{marker}\n| an old table |\n<!-- /bench/results.py -->\nafter\n")
    assert results.rewrite_docs(doc) == 1 and results.rewrite_docs(doc) == 0
    text = doc.read_text()
    assert text.startswith(f"before\n{marker}\n| student | method |") and text.endswith("<!-- /bench/results.py -->\nafter\n")
    assert "| 3 layers | student fine-tuned without a teacher |  | 56.0 ± 1.4 (n=2) | - |" in text


def test_bench_general_task_stage_reads_the_shared_teacher_cache_and_keeps_its_records(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("general_bench", REPO / "bench" / "general.py")
    general = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(general)
    grid = sys.modules["results_grid"]
    launched = []

    def fake_launch(cmd, threads, run=None):
        out = Path(cmd[cmd.index("--output") + 1])
        launched.append((cmd[3], out.name, [a for a in cmd if a.startswith("teacher.cache=")]))
        if cmd[3] == "cache-teacher":
            out.mkdir(parents=True)
            (out / "manifest.json").write_text("{}")
        else:
            _fake_run(out, {"f1": 0.8, "loss": 0.5})

    monkeypatch.setattr(grid, "launch", fake_launch)
    monkeypatch.setattr(general, "launch", fake_launch)
    root, keep = tmp_path / "runs", tmp_path / "results"
    _fake_run(grid.teacher_dir(root, "mrpc"), {"f1": 0.85})
    _predictions(grid.teacher_dir(root, "mrpc"), [1, 0], [1, 1])
    args = Namespace(root=root, keep=keep, tasks=["mrpc"], seeds=[1], threads=1, student_sets=[],
                     rows=["general_init", "kronecker_general"])
    general.run_grid(args)
    cache = [f"teacher.cache={grid.teacher_cache_dir(root, 'mrpc')}"]
    assert launched == [("distill", "minilm_l3", []), ("cache-teacher", "teacher-cache", []),
                        ("distill", "L3-general_init-s1", cache), ("distill", "kronecker_l3", []),
                        ("distill", "L3-kronecker_general-s1", cache)]
    for run in (general.general_dir(root, "minilm_l3"), general.task_dir(root, "mrpc", "general_init", 1)):
        assert grid.completed(grid.kept(keep, run))


def test_rows_option_keeps_the_listed_rows_and_the_chain_they_are_compared_with(tmp_path, capsys):
    import numpy as np
    import pytest

    from dskd.data.significance import holm

    results = _results_module()
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 200).tolist()
    _fake_run(results.teacher_dir(tmp_path, "sst2"), {"accuracy": 0.85})
    _fake_run(results.teacher_dir(tmp_path, "sst2", "full"), {"accuracy": 0.9})
    _fake_runs_with_predictions(results, tmp_path, {m: (right, (1, 2)) for m, right in (
        ("no_teacher", 0.7), ("soft_kd", 0.72), ("internal_all", 0.8), ("soft_kd@full", 0.78),
        ("soft_kd@full+unlabeled", 0.85))}, labels, rng)
    args = results.build_parser().parse_args(["--root", str(tmp_path), "--tasks", "sst2", "--layers", "3", "--seeds",
                                              "1", "2", "--rows", "soft_kd@full+unlabeled", "--table-only"])
    table = results.tables(args)
    # The variant's chain of references (its own, soft_kd's, no_teacher's) stays; internal_all goes.
    assert list(table["sst2"]["rows"]) == ["L3/no_teacher", "L3/soft_kd", "L3/soft_kd@full", "L3/soft_kd@full+unlabeled"]
    family = list(table["sst2"]["compare"].values())
    assert len(family) == 3 and [c["p_holm"] for c in family] == holm([c["p"] for c in family])
    assert "internal KD" not in results.tables_markdown(args, table)
    args.pairs = [("internal_all", "soft_kd")]  # a pair's rows are kept even when --rows leaves them out
    assert "L3/internal_all" in results.tables(args)["sst2"]["rows"]
    with pytest.raises(SystemExit):
        results.build_parser().parse_args(["--rows", "soft_kd@half"])
    assert "'soft_kd@half': a row is a method" in capsys.readouterr().err


def test_metric_option_reports_and_tests_another_metric_and_names_a_task_without_it(tmp_path):
    import numpy as np
    import pytest

    from dskd.data import metrics
    from dskd.data.significance import paired_bootstrap

    results = _results_module()
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 150)
    _fake_run(results.teacher_dir(tmp_path, "mrpc"), {"f1": 0.85, "accuracy": 0.8})
    kept = {}
    for method, right in (("no_teacher", 0.7), ("soft_kd", 0.75)):
        kept[method] = []
        for seed in (1, 2):
            predicted = np.where(rng.random(150) < right, labels, 1 - labels)
            folder = results.student_dir(tmp_path, "mrpc", 3, method, seed)
            _fake_run(folder, {"f1": metrics.f1(predicted, labels), "accuracy": metrics.accuracy(predicted, labels)})
            _predictions(folder, predicted.tolist(), labels.tolist())
            kept[method].append(predicted.tolist())
    args = results.build_parser().parse_args(["--root", str(tmp_path), "--tasks", "mrpc", "--layers", "3", "--seeds",
                                              "1", "2", "--metric", "accuracy", "--table-only"])
    table = results.tables(args)
    assert table["mrpc"]["metric"] == "accuracy"
    want = paired_bootstrap("accuracy", kept["soft_kd"], kept["no_teacher"], labels.tolist())
    assert {k: table["mrpc"]["compare"]["L3/soft_kd"][k] for k in want} == want
    mean = 100 * np.mean([np.mean(np.array(p) == labels) for p in kept["soft_kd"]])
    text = results.markdown({"mrpc": table["mrpc"]}, [3])
    assert text.startswith("| student | method | vs | mrpc accuracy | Δ [95% CI] p |") and "| 80.0 |" in text
    assert f"| soft-label KD | student fine-tuned without a teacher | {mean:.1f} ± " in text
    assert "% of teacher" in results.tables_markdown(args, table)
    args.cost = False  # --no-cost: the main table alone
    assert results.tables_markdown(args, table) == text
    _fake_run(results.teacher_dir(tmp_path, "sst2"), {"accuracy": 0.9})
    args.tasks, args.metric = ["sst2"], "f1"
    with pytest.raises(SystemExit, match="--metric f1: sst2's runs report accuracy; choose one of those"):
        results.tables(args)


def test_a_run_another_lane_is_writing_is_left_to_it(tmp_path, capsys):
    """Lanes of one grid may meet at a run: the one that finds it locked by a live process moves on."""
    _results_module()
    grid = sys.modules["results_grid"]
    out = grid.student_dir(tmp_path, "rte", 3, "soft_kd", 1)
    out.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": sleeper.pid, "slurm_job": None,
                                               "since": "then"}))
        args = Namespace(root=tmp_path, keep=None, seeds=[1], layers=[3], tasks=["rte"], methods=["soft_kd"],
                         threads=1, student_sets=[])
        grid.run_grid(args)  # without the skip it would fine-tune the teacher and train the student here
        assert f"- {out}: being written by pid {sleeper.pid} since then; left to it" in capsys.readouterr().out
        assert not (tmp_path / "rte" / "teacher").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not grid.busy(out)  # its process is gone: the run is any lane's again
