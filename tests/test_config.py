import pytest

from dskd.config import ArchConfig, ExperimentConfig
from dskd.methods import load_experiment
from dskd.errors import DskdError

from conftest import write_config


def test_loads_tiny_yaml_into_typed_schema(tmp_path):
    cfg = load_experiment(write_config(tmp_path / "c.yaml"))
    assert isinstance(cfg, ExperimentConfig)
    assert isinstance(cfg.teacher.arch, ArchConfig) and cfg.teacher.arch.hidden == 32
    assert cfg.training.lr == 1e-3 and isinstance(cfg.training.epochs, float)
    assert cfg.losses["soft_kd"] == {"weight": 0.5, "temperature": 2.0}


def test_set_overrides_are_typed_and_validated(tmp_path):
    path = write_config(tmp_path / "c.yaml")
    cfg = load_experiment(path, ["training.lr=3e-5", f"data.path={tmp_path}", "student.teacher_layers=[2]"])
    assert cfg.training.lr == 3e-5 and cfg.data.path == str(tmp_path) and cfg.student.teacher_layers == [2]
    with pytest.raises(DskdError, match=r"`training.batch_size` must be an integer, got 'big'"):
        load_experiment(path, ["training.batch_size=big"])
    with pytest.raises(DskdError, match=r"expected key.sub=value"):
        load_experiment(path, ["training.lr"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"training.lr_rate": 1}, r"unknown key `training.lr_rate`; did you mean `training.lr`\?"),
        # Hugging Face's names for our keys
        ({"training.learning_rate": 1}, r"unknown key `training.learning_rate`; did you mean `training.lr`\?"),
        ({"finetune.num_train_epochs": 1}, r"unknown key `finetune.num_train_epochs`; did you mean `finetune.epochs`\?"),
        ({"data.max_seq_length": 64}, r"unknown key `data.max_seq_length`; did you mean `data.max_length`\?"),
        ({"training.epoch": 1}, r"unknown key `training.epoch`; did you mean `training.epochs`\?"),
        ({"training.epochs": "three"}, r"`training.epochs` must be a number, got 'three'"),
        ({"training.batch_size": True}, r"`training.batch_size` must be an integer"),
        ({"teacher.arch.layers": 2.5}, r"`teacher.arch.layers` must be an integer"),
        ({"teacher.arch.model_type": "gpt2"}, r"`teacher.arch.model_type` must be 'bert' or 'roberta'"),
        ({"teacher.arch": None}, r"set `teacher.path` \(a model folder or dskd run\), `teacher.arch` .* or `teacher.cache`"),
        ({"teacher.arch": None, "teacher.cache": "runs/cache"},
         r"`student.init_from_teacher` copies teacher layers into the student, which needs `teacher.path`"),
        ({"teacher.tokenizer": None}, r"built from `teacher.arch` needs `teacher.tokenizer`"),
        ({"student.layers": 2, "student.teacher_layers": [1]}, r"`student.layers` is 2 but `student.teacher_layers` lists 1"),
        ({"losses.soft_kd.temprature": 2}, r"unknown key `losses.soft_kd.temprature` for loss 'soft_kd'"),
        ({"losses.soft_kd.temperature": 0}, r"`losses.soft_kd`: temperature must be positive"),
        ({"losses.extra": {"weight": 1}}, r"`losses.extra` has unknown loss type 'extra'"),
        ({"losses.hard_ce.weight": -1}, r"`losses.hard_ce.weight` must be a finite non-negative number"),
        ({"training.warmup_ratio": 1.5}, r"`training.warmup_ratio` must be in \[0, 1\)"),
        ({"data.train_limit": 0}, r"`data.train_limit` must be at least 1"),
        ({"schedule": [{"name": "a", "epochs": 1, "steps": 3}]}, r"`schedule\[0\]` \(a\) needs exactly one of"),
        ({"schedule": [{"name": "a", "epochs": 1, "losses": {"nope": 1.0}}]}, r"`schedule\[0\].losses.nope` is not a term"),
        ({"schedule": [{"name": "a", "epochs": 1, "losses": {"hard_ce": 0.0}}]}, r"`schedule\[0\].losses` \(a\) turns every term off"),
        ({"schedule": [{"name": "a", "epochs": 1, "layers": [1], "per_layer": "stacked"}]},
         r"`schedule\[0\]` \(a\) sets both `layers` and `per_layer`"),
        ({"schedule": [{"name": "a", "epochs": 1, "per_layer": "sideways"}]},
         r"`schedule\[0\].per_layer` must be 'progressive' or 'stacked', got 'sideways'"),
        ({"schedule": [{"name": "a", "epochs": 1, "plateau": {"every": 0}}]}, r"`schedule\[0\].plateau.every` must be at least 1"),
        ({"schedule": [{"name": "a", "epochs": 1, "plateau": {"patience": 2}}]}, r"missing required key\(s\) `schedule\[0\].plateau.every`"),
        ({"layer_map": [2, 4]}, r"`layer_map` lists 2 teacher layers but the student has 1 layers"),
        ({"layer_map": [0]}, r"`layer_map\[0\]` must be a 1-based teacher layer, got 0"),
        ({"losses.attention_kl": {"weight": 1.0, "heads": 2}}, r"`losses.attention_kl.heads` must be a string, got 2"),
        ({"losses.attention_kl": {"weight": 1.0, "heads": "max"}}, r"`losses.attention_kl`: heads must be 'auto' or 'mean'"),
        ({"training.lr_schedule": "cosine"}, r"`training.lr_schedule` must be 'global' or 'per_stage'"),
        ({"losses.hard_ce.weight": 0, "losses.soft_kd.weight": 0}, r"every term in `losses` has weight 0"),
        ({"training.global_batch_size": 0}, r"`training.global_batch_size` must be at least 1"),
        ({"training.global_batch_size": 64, "training.grad_accum": 2},
         r"`training.global_batch_size` derives `training.grad_accum` from the number of ranks; set one of them"),
        ({"finetune.global_batch_size": 40}, r"`finetune.global_batch_size` \(40\) must be a multiple of "
                                              r"`finetune.batch_size` \(16\)"),
    ],
)
def test_bad_config_names_the_key(tmp_path, overrides, message):
    with pytest.raises(DskdError, match=message):
        load_experiment(write_config(tmp_path / "c.yaml", overrides))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(DskdError, match=r"config file .*nope.yaml does not exist"):
        load_experiment(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [1, 2\n")
    with pytest.raises(DskdError, match=r"bad.yaml: not valid YAML"):
        load_experiment(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(DskdError, match=r"top level must be a mapping"):
        load_experiment(bad)


def test_shipped_configs_validate():
    from conftest import REPO

    paths = sorted((REPO / "configs").rglob("*.yaml"))  # the recipes under results/ and noise/ too
    assert len(paths) > 20
    for path in paths:  # as recipes: their teachers are runs that earlier commands write
        load_experiment(path, check_paths=False)


def test_pypkg_paths_resolve_inside_installed_packages():
    from pathlib import Path

    from dskd.config import resolve_path

    assert Path(resolve_path("pypkg://dskd/resources/bert-base-uncased/vocab.txt")).is_file()
    with pytest.raises(DskdError, match=r"pypkg://no_such_pkg/model: Python package 'no_such_pkg' is not installed"):
        resolve_path("pypkg://no_such_pkg/model")


def test_global_batch_size_derives_grad_accum_for_each_world_size(tmp_path):
    from dskd.training.engine import at_world_size, describe_batch

    training = load_experiment(write_config(tmp_path / "c.yaml", {"training.global_batch_size": 256})).training
    # batch_size 16: 256 = world x 16 x grad_accum, from 1 to 16 ranks
    assert {w: at_world_size(training, w).grad_accum for w in (1, 2, 4, 8, 16)} == {1: 16, 2: 8, 4: 4, 8: 2, 16: 1}
    assert describe_batch(at_world_size(training, 4), 4) == (
        "global batch 256 = 4 rank(s) x batch_size 16 x grad_accum 4 (derived from training.global_batch_size)")
    with pytest.raises(DskdError, match=r"`training.global_batch_size` 256 is not a multiple of 32 rank\(s\) x "
                                        r"`training.batch_size` 16 = 512, .* \(e.g. 512\)"):
        at_world_size(training, 32)
    with pytest.raises(DskdError, match=r"not a multiple of 3 rank\(s\) x `training.batch_size` 16 = 48, .*"
                                        r"multiple of 48 \(e.g. 240 or 288\)"):
        at_world_size(training, 3)
    plain = load_experiment(write_config(tmp_path / "d.yaml")).training  # null: grad_accum as given
    assert at_world_size(plain, 8) is plain
    assert describe_batch(plain, 8) == "global batch 128 = 8 rank(s) x batch_size 16 x grad_accum 1"
