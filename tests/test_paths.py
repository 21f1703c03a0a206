"""Paths and hub names (issue 23): a mistyped local path fails at once naming its key instead of
becoming a hub request retried for most of a minute; a hub name is tried only when it can load; an
offline hub says "offline"; a teacher built from `teacher.arch` is refused unless `teacher.random_ok`."""

from __future__ import annotations

import sys
import time

import pytest
from conftest import REPO, dskd_env, write_config

from dskd.config import check_source, check_trained_teacher, paths
from dskd.errors import DskdError
from dskd.methods import load_experiment

MODEL = "give a model folder or a dskd run folder"
FAST = 2.0  # seconds; a hub request with back-off took 28-60 s


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 with an empty hub cache, run from a folder that holds `runs/`."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def timed_error(call) -> str:
    start = time.perf_counter()
    with pytest.raises(DskdError) as info:
        call()
    assert time.perf_counter() - start < FAST
    return str(info.value)


@pytest.mark.parametrize("value", ["./nope", "/no/such/teacher", "~/no-such-dskd-teacher", "runs/does-not-exist",
                                   "a/b/c", "pkg://no-such-resource"])
def test_a_local_looking_path_that_does_not_exist_fails_at_once(value, monkeypatch, tmp_path):
    (tmp_path / "runs").mkdir()  # `runs/typo`: its parent exists, so it is a path, not the hub name runs/typo
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(paths, "hub_unreachable", lambda: pytest.fail("the hub was asked about a path"))
    message = timed_error(lambda: check_source(value, "`teacher.path`"))
    expanded = paths.Path(paths.resolve_path(value)).expanduser()
    shown = value if not value.startswith(("~", "pkg://")) else f"{value} ({expanded})"
    assert message == f"`teacher.path` points to {shown}, which does not exist; {MODEL}"


@pytest.mark.parametrize("value", ["bert-base-uncased", "org/name", "runs/typo"])
def test_a_hub_name_offline_and_not_cached_gets_the_offline_message(value, offline):
    (offline / "runs").rmdir()  # `runs/typo` without a runs/ folder can be a hub name
    message = timed_error(lambda: check_source(value, "--model"))
    assert message == (f"--model is {value}: no such local folder, and as a hub name it cannot be loaded because the "
                       f"hub is offline (HF_HUB_OFFLINE is set and {offline / 'hub-cache'} holds no copy); give a local "
                       f"folder (a model folder or a dskd run folder), or download it where there is network "
                       f"(hf download {value}) and point --model at the copy")


def test_a_cached_hub_name_loads_offline_and_an_unreachable_hub_says_offline(offline, monkeypatch):
    snapshot = offline / "hub-cache" / "models--org--name" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    check_source("org/name", "--model")  # in the cache: transformers loads it offline
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(paths, "hub_unreachable", lambda: "huggingface.co:443 cannot be reached: test")
    check_source("org/name", "--model")  # cached: loaded with local_files_only
    assert paths.hub_kwargs("org/name", "--model") == {"local_files_only": True}
    message = timed_error(lambda: check_source("org/other", "--model"))
    assert message.startswith("--model is org/other: no such local folder, and as a hub name it cannot be loaded "
                              "because the hub is offline (huggingface.co:443 cannot be reached: test); ")
    monkeypatch.setattr(paths, "hub_unreachable", lambda: None)
    check_source("org/other", "--model")  # a reachable hub is asked
    assert paths.hub_kwargs("org/other", "--model") == {}


def test_an_unreachable_endpoint_is_found_in_one_short_attempt(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    paths.hub_unreachable.cache_clear()
    try:
        start = time.perf_counter()
        why = paths.hub_unreachable()
        assert time.perf_counter() - start < FAST + paths.HUB_PROBE_SECONDS
    finally:
        paths.hub_unreachable.cache_clear()
    assert why is not None and why.startswith("127.0.0.1:9 cannot be reached: ")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # behind a proxy, the proxy must answer
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    try:
        assert paths.hub_unreachable().startswith("127.0.0.1:9 cannot be reached: ")
    finally:
        paths.hub_unreachable.cache_clear()


@pytest.mark.parametrize("key, value, what", [
    ("teacher.path", "runs/does-not-exist", MODEL),
    ("teacher.tokenizer", "./vocab.txt", "give a tokenizer folder, a vocab.txt or a sentencepiece .model file"),
    ("student.init", "runs/general", MODEL),
    ("data.path", "glue", "give a GLUE-format folder (the GLUE root or the task's folder), or null to load the "
                          "task from the hub"),
])
def test_every_config_key_that_names_a_path_is_checked_at_load(key, value, what, offline):
    overrides = {key: value}
    if key == "student.init":
        overrides["student"] = {"init": value, "init_from_teacher": True}
    config = write_config(offline / "c.yaml", overrides)
    message = timed_error(lambda: load_experiment(config))
    assert message == f"{config}: `{key}` points to {value}, which does not exist; {what}"


def test_schedule_teachers_and_corpus_files_are_checked_at_load(offline):
    config = write_config(offline / "c.yaml", {"schedule": [{"name": "a", "epochs": 1, "teacher": "./traj/step1"}]})
    assert timed_error(lambda: load_experiment(config)) == \
        f"{config}: `schedule[0].teacher` points to ./traj/step1, which does not exist; {MODEL}"
    config = offline / "g.yaml"
    config.write_text((REPO / "configs" / "general" / "tiny.yaml").read_text())
    message = timed_error(lambda: load_experiment(config, ["data.corpus.files=[pkg://corpus-sample, ./more.txt]"]))
    assert message == (f"{config} (with --set): `data.corpus.files[1]` points to ./more.txt, which does not exist; "
                       "give .txt, .jsonl or .parquet files or folders of them")
    assert load_experiment(config, ["data.corpus.files=[./more.txt]"], check_paths=False).data.corpus.files


def test_models_are_loaded_only_from_what_exists_or_a_hub_that_can_serve_them(offline, monkeypatch):
    """What `dskd robustness --models` (each in its turn), plan and the teacher loaders go through."""
    from dskd import models
    from dskd.config import TeacherConfig

    message = timed_error(lambda: models.load_tokenizer(TeacherConfig(path="./nope"), key="--models"))
    assert message == f"`--models` points to ./nope, which does not exist; {MODEL}"
    message = timed_error(lambda: models.load_pretrained("runs/typo", 2, for_finetune=False))
    assert message == f"`teacher.path` points to runs/typo, which does not exist; {MODEL}"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(paths, "hub_unreachable", lambda: "huggingface.co:443 cannot be reached: test")
    message = timed_error(lambda: models.pretrained_config("org/teacher", 2))
    assert message.startswith("`teacher.path` is org/teacher: no such local folder, and as a hub name it cannot be "
                              "loaded because the hub is offline (huggingface.co:443 cannot be reached: test)")


@pytest.mark.parametrize("args, message", [
    (["evaluate", "--model", "runs/nope", "--config", "configs/tiny.yaml"],
     f"--model points to runs/nope, which does not exist; {MODEL}"),
    (["robustness", "--models", "runs/teacher", "--mlm", "/no/such/mlm", "--config", "configs/tiny.yaml",
      "--output", "x"],
     "--mlm points to /no/such/mlm, which does not exist; give a folder with a masked-LM model (e.g. bert-base with "
     "its MLM head), or leave --mlm out to use each model's own embedding neighbours"),
    (["export", "--run", "runs/nope", "--out", "x"],
     "--run points to runs/nope, which does not exist; give the --output folder of a finetune or distill run"),
    (["evaluate", "--model", "org/model", "--config", "configs/tiny.yaml"],
     "--model is org/model: no such local folder, and as a hub name it cannot be loaded because the hub is offline "
     "(127.0.0.1:9 cannot be reached: Connection refused); give a local folder"),
])
def test_model_flags_fail_before_anything_heavy_is_imported(args, message, tmp_path):
    import subprocess

    (tmp_path / "runs" / "teacher").mkdir(parents=True)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = dskd_env(tmp_path)
    env.pop("HF_HUB_OFFLINE")
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # a hub that refuses at once: the network case, without a network
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dskd", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"dskd: error: {message}"), proc.stderr
    assert proc.stderr.count("\n") == 1
    assert elapsed < 20  # no torch: well under a second on an idle machine


def test_commands_with_models_from_flags_check_only_the_configs_data_paths(tmp_path):
    """evaluate and robustness take their models from --model(s): a recipe's teacher.path that does not
    exist here (configs/results/* name runs/...) is no reason to refuse, a missing data.path is."""
    from dskd.config import load_config

    recipe = REPO / "configs" / "results" / "soft_kd.yaml"
    missing = [f"teacher.path={tmp_path / 'no-teacher'}", f"data.path={tmp_path}"]
    with pytest.raises(DskdError, match=r"`teacher.path` points to .*no-teacher, which does not exist"):
        load_config(recipe, missing)
    assert load_config(recipe, missing, check_paths="data").teacher.path == str(tmp_path / "no-teacher")
    with pytest.raises(DskdError, match=r"`data.path` points to .*no-data, which does not exist"):
        load_config(recipe, [missing[0], f"data.path={tmp_path / 'no-data'}"], check_paths="data")
    from dskd.cli import CONFIG_PATHS

    assert CONFIG_PATHS == {"evaluate": "data", "robustness": "data"}


# ------------------------------------------------------------------------ no silent random teacher

RANDOM = ("`dskd {}` would use a randomly initialised teacher: `teacher.path` is not set, so the teacher is built "
          "from `teacher.arch` and was never trained. Set `teacher.path` to a fine-tuned run (dskd finetune --config "
          "C --output DIR, then --set teacher.path=DIR), or set `teacher.random_ok: true` to use a random teacher on "
          "purpose (smoke tests)")


def test_a_teacher_built_from_arch_is_refused_unless_random_ok(tmp_path):
    from dskd.commands.cache_teacher import cache_teacher
    from dskd.methods.universal_probes import train_probes
    from dskd.training.job import prepare

    cfg = load_experiment(write_config(tmp_path / "c.yaml", {"teacher.random_ok": False}))
    for command, call in (
        ("distill", lambda: prepare(cfg, "distill", tmp_path / "run", None, False, False)),
        ("cache-teacher", lambda: cache_teacher(cfg, tmp_path / "cache", None, None, None, False, [])),
        ("train-probes", lambda: train_probes(cfg, tmp_path / "probes", None, 1, 1e-2, 8, None, False, [])),
    ):
        with pytest.raises(DskdError) as info:
            call()
        assert str(info.value) == RANDOM.format(command)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # nothing written
    check_trained_teacher(load_experiment(write_config(tmp_path / "ok.yaml")), "distill")  # TINY says random_ok
    trained = tmp_path / "teacher"
    trained.mkdir()
    check_trained_teacher(load_experiment(write_config(tmp_path / "t.yaml", {"teacher.random_ok": False,
                                                                             "teacher.path": str(trained)})), "distill")


def test_the_quick_start_config_cannot_distil_an_untrained_teacher(tmp_path):
    from conftest import run_dskd

    proc = run_dskd(["distill", "--config", "configs/quickstart.yaml", "--output", tmp_path / "qs"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"dskd: error: {RANDOM.format('distill')}")
    assert not (tmp_path / "qs").exists()
