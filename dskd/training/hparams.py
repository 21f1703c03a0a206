"""The run's entry in TensorBoard's HParams dashboard.

A session is declared when the run starts, so running, halted and crashed runs are listed
beside finished ones, with the metrics of their latest evaluation (the plugin reads them from
the run's ``eval/*`` scalars). The hyper-parameters are the few keys that matter for the job:
the keys a sweep changed (``--set``, ``--deepspeed``) first, then the role's own keys; a
distillation does not list the ``finetune.*`` section it never uses, nor unset (null) keys.

TensorBoard keeps the first session-end record it reads for a run, so the end status is
written only when the run ends (success or failure) in a small event file of its own, and that
file is deleted when the run starts again: a failed run that is resumed is no longer failed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

# The keys listed for every run, after the swept ones; TRAINING_KEYS are read from the role's
# section (`training` for distill, `finetune` for finetune).
COMMON_KEYS = ("seed", "data.task", "data.max_length", "data.train_limit")
TRAINING_KEYS = ("lr", "batch_size", "grad_accum", "epochs", "max_steps", "warmup_ratio", "warmup_steps",
                 "weight_decay", "max_grad_norm", "deepspeed", "lr_schedule")
DISTILL_KEYS = ("teacher.path", "teacher.cache", "student.init", "student.layers", "student.teacher_layers",
                "student.arch.layers", "student.arch.hidden", "layer_map", "losses", "schedule")
STATUS_SUFFIX = ".dskd-status"  # the event file that holds the session-end record


def swept_keys(argv: list[str], role: str = "distill") -> list[str]:
    """The config keys this command line set (`--set k=v`, `--set=k=v`; `--deepspeed` as the
    role's `<section>.deepspeed`), in order."""
    keys = []
    for i, arg in enumerate(argv):
        value = None
        if arg == "--set" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--set="):
            value = arg[len("--set="):]
        elif arg == "--deepspeed" or arg.startswith("--deepspeed="):
            value = ("finetune" if role == "finetune" else "training") + ".deepspeed="
        if value and "=" in value:
            key = value.split("=", 1)[0].strip()
            if key and key not in keys:
                keys.append(key)
    return keys


def run_hparams(config: dict, role: str, argv: list[str], world_size: int) -> dict[str, float | str | bool]:
    """``{dotted key: value}`` for the dashboard: swept keys first, then the role's keys.
    Lists and mappings (a layer map, a stage list) become compact JSON text; nulls are left out."""
    section = "finetune" if role == "finetune" else "training"
    keys = swept_keys(argv, role)
    keys += list(COMMON_KEYS) + [f"{section}.{k}" for k in TRAINING_KEYS]
    if role != "finetune":
        keys += list(DISTILL_KEYS)
    out: dict[str, float | str | bool] = {}
    for key in keys:
        if role != "finetune" and key.startswith("finetune."):
            continue
        found, value = _lookup(config, key)
        if not found or value is None or key in out:
            continue
        if key == "losses" and isinstance(value, dict):  # one column per term setting: losses.soft_kd.weight
            for name, spec in value.items():
                for param, v in (spec or {}).items():
                    if v is not None:
                        out.setdefault(f"losses.{name}.{param}", _scalar(v))
            continue
        if key == "schedule" and isinstance(value, list):
            if value:
                out[key] = " > ".join(str(stage.get("name")) for stage in value)
            continue
        out[key] = _scalar(value)
    out["world_size"] = world_size
    return out


def _lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _scalar(value):
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, separators=(",", ":"))


def metric_tags(task) -> list[str]:
    """The scalars the dashboard shows per session: the task's dev metrics and the dev loss."""
    names = list(getattr(task, "metrics", ()) or ())
    if task.main_metric not in names:
        names.insert(0, task.main_metric)
    if getattr(task, "mlm", False):
        names += ["mlm_ce"]
    return [f"eval/{name}" for name in dict.fromkeys(names + ["loss"])]


def _summary(tag: str, **plugin_data):
    """One hparams-plugin summary (built from the protos: the plugin's own `summary` module
    needs TensorFlow)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **plugin_data)
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                                                  content=content.SerializeToString()))
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


def session_start(hparams: dict, metrics: list[str], swept: frozenset[str] = frozenset()) -> list:
    """The experiment and session-start summaries (written at every start of the run; the
    dashboard keeps the first, which a resume repeats unchanged). ``swept`` keys are marked as
    the ones that differ between runs: the dashboard sorts those first, the rest by name."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    infos, start = [], plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for name, value in hparams.items():
        if isinstance(value, bool):  # before int: a bool is an int to isinstance
            kind, start.hparams[name].bool_value = api_pb2.DATA_TYPE_BOOL, value
        elif isinstance(value, (int, float)):
            kind, start.hparams[name].number_value = api_pb2.DATA_TYPE_FLOAT64, value
        else:
            kind, start.hparams[name].string_value = api_pb2.DATA_TYPE_STRING, str(value)
        infos.append(api_pb2.HParamInfo(name=name, type=kind, differs=name in swept))
    experiment = api_pb2.Experiment(hparam_infos=infos,
                                    metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in metrics])
    return [_summary(metadata.EXPERIMENT_TAG, experiment=experiment),
            _summary(metadata.SESSION_START_INFO_TAG, session_start_info=start)]


def clear_status(log_dir: Path) -> None:
    for old in Path(log_dir).glob(f"events.out.tfevents.*{STATUS_SUFFIX}"):
        old.unlink(missing_ok=True)


def write_status(log_dir: Path, succeeded: bool) -> None:
    """The session's end: Success or Failure in the dashboard's Status column."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from torch.utils.tensorboard import SummaryWriter

    clear_status(log_dir)
    status = api_pb2.STATUS_SUCCESS if succeeded else api_pb2.STATUS_FAILURE
    writer = SummaryWriter(log_dir=str(log_dir), filename_suffix=STATUS_SUFFIX)
    end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    writer.file_writer.add_summary(_summary(metadata.SESSION_END_INFO_TAG, session_end_info=end))
    writer.close()
