"""dskd report: the swept keys and final metrics of many runs in one table, best first."""

from __future__ import annotations

import json

import pytest
import yaml

from dskd.errors import DskdError
from dskd.training.report import collect, flatten, format_table


def _run(folder, lr, seed, accuracy, status="completed"):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "training": {"lr": lr, "epochs": 2},
                                                        "layer_map": [2, 4]}))
    (folder / "run.json").write_text(json.dumps({"status": status, "task": "sst2"}))
    if accuracy is not None:
        (folder / "metrics.json").write_text(json.dumps({"task": "sst2", "accuracy": accuracy, "step": 10}))


def test_the_table_keeps_what_differs_and_sorts_by_the_main_metric(tmp_path):
    _run(tmp_path / "a", 1e-4, 1, 0.80)
    _run(tmp_path / "b", 3e-5, 1, 0.85)
    _run(tmp_path / "nested" / "c", 1e-4, 2, None, status="preempted")
    report = collect([tmp_path])
    assert report["swept"] == ["seed", "training.lr"]
    table = format_table(report).splitlines()
    assert table[0] == "| run | seed | training.lr | accuracy | step | status |"
    assert table[2] == "| b | 1 | 3e-05 | 85.00 | 10 | completed |"
    assert table[3] == "| a | 1 | 0.0001 | 80.00 | 10 | completed |"
    assert table[4] == "| c | 2 | 0.0001 | - | - | preempted |"


def test_flatten_and_folders_without_runs(tmp_path):
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": "null"}
    with pytest.raises(DskdError, match="no run folders"):
        collect([tmp_path])
    with pytest.raises(DskdError, match="does not exist"):
        collect([tmp_path / "missing"])
