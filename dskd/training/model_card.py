"""The model card (``README.md``) of an exported model: Hugging Face's format (YAML front matter
with ``pipeline_tag``, ``tags`` and, for a GLUE task, the dev metrics as ``model-index``), then
what a colleague needs to trust and reproduce it: task and labels, the dev metrics the run
recorded for this very checkpoint, the teacher and its metrics, the loss terms with their
weights, the model's size and shape, the command, dskd's version and the dates.

Metrics are copied, never recomputed: from ``metrics.json`` when the export is the run's final
model, else from the evaluation the checkpoint itself recorded at its step (if any)."""

from __future__ import annotations

import datetime
import json
import shlex
from pathlib import Path

import yaml

import dskd
from dskd import data
from dskd.methods import METHOD_REGISTRY
from dskd.training import checkpoint
from dskd.training.run_dir import METRICS_FILE, saved_config

PIPELINE_TAGS = {"AutoModelForSequenceClassification": "text-classification", "AutoModelForMaskedLM": "fill-mask",
                 "AutoModel": "feature-extraction"}


def tag_step(tag: str) -> int:
    return int(tag.removeprefix("step"))


def recorded_metrics(run_dir: Path, tag: str, info: dict, final_metrics: dict | None) -> tuple[dict | None, bool]:
    """(the dev metrics recorded for checkpoint ``tag``, whether it is the run's final model).

    ``final_metrics``: the run's result, given by a run exporting its own final model before it
    writes ``metrics.json``. Otherwise the checkpoint is final when the run completed at its step."""
    if final_metrics is not None:
        return final_metrics, True
    step = tag_step(tag)
    path = run_dir / METRICS_FILE
    recorded = json.loads(path.read_text()) if path.is_file() else None
    if info.get("status") == "completed" and isinstance(recorded, dict) and recorded.get("step") == step:
        return recorded, True
    # A mid-run checkpoint: the evaluation it holds, when one was made at its very step.
    state = checkpoint.client_state(run_dir / "checkpoints", tag)
    last = state.get("last_eval") or {}
    if last.get("step") != step:
        return None, False
    metrics = {"task": info.get("task"), **{k: v for k, v in last.items() if k != "step"}, "step": step}
    if state.get("teacher_metrics"):
        metrics["teacher"] = {"task": info.get("task"), **state["teacher_metrics"]}
    return metrics, False


def _scores(metrics: dict | None) -> dict:
    """The scalar metrics of a metrics dict (not its task, step, best or teacher)."""
    return {k: v for k, v in (metrics or {}).items() if k not in ("task", "step", "best", "teacher")
            and isinstance(v, (int, float))}


def _table(scores: dict) -> list[str]:
    # repr: the card shows exactly the number metrics.json holds
    return ["| metric | value |", "|---|---|", *(f"| {k} | {v!r} |" for k, v in scores.items())]


def _command(info: dict) -> str:
    argv = [str(a) for a in info.get("command") or []]
    if not argv:
        return "(not recorded)"
    if Path(argv[0]).name in ("__main__.py", "dskd"):
        argv = ["dskd", *argv[1:]]
    return shlex.join(argv)


def _front_matter(pipeline_tag: str, task_name: str, glue: data.TaskSpec | None, scores: dict, name: str,
                  split_note: str) -> str:
    meta = {"library_name": "transformers", "pipeline_tag": pipeline_tag,
            "tags": ["dskd", "knowledge-distillation", task_name, pipeline_tag]}
    if glue is not None:
        meta["datasets"] = [glue.hub_name[0]]
        meta["metrics"] = list(glue.metrics)
        if scores:
            meta["model-index"] = [{"name": name, "results": [{
                "task": {"type": pipeline_tag, "name": "Text Classification"},
                "dataset": {"type": glue.hub_name[0], "name": f"GLUE {glue.folder}", "config": glue.hub_name[1],
                            "split": f"validation{split_note}"},
                "metrics": [{"type": k, "value": v, "name": f"dev {k}"} for k, v in scores.items()],
            }]}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def render(run_dir: Path, out: Path, tag: str, model, info: dict, max_tokens: int,
           final_metrics: dict | None = None) -> str:
    """The card of ``model``, exported from checkpoint ``tag`` of ``run_dir`` into ``out``; its
    tokenizer truncates at ``max_tokens``."""
    cfg = saved_config(run_dir)
    role = info.get("role", "distill")
    model_class = info.get("model_class") or data.TaskSpec.model_class
    pipeline_tag = PIPELINE_TAGS.get(model_class, "feature-extraction")
    task_name = info.get("task") or cfg.get("data", {}).get("task", "")
    glue = data.GLUE_TASKS.get(task_name)
    metrics, final = recorded_metrics(run_dir, tag, info, final_metrics)
    scores = _scores(metrics)
    dev_limit = cfg.get("data", {}).get("dev_limit")
    split_note = f"[:{dev_limit}]" if glue is not None and dev_limit else ""
    step, config = tag_step(tag), model.config
    # A run's own model/ (or trajectory/<tag>/) is named after the run.
    inside = out.resolve().is_relative_to(run_dir.resolve())
    name = (run_dir.name + ("" if final else f"-{tag}")) if inside else out.name
    lines = [_front_matter(pipeline_tag, task_name, glue, scores, name, split_note), f"# {name}", ""]
    if not final:
        status = info.get("status", "unknown")
        lines += [f"> **Not the final model.** This is checkpoint `{tag}` (step {step}) of a run whose status is "
                  f"`{status}`" + (f" and whose final model is from step {_final_step(run_dir)}" if status ==
                                   "completed" else "") + ". Export the run without `--tag` for its final model.", ""]
    what = "Fine-tuned with hard labels" if role == "finetune" else "Distilled from a teacher"
    lines += [f"{what} by dskd {dskd.__version__} (`dskd {role}`), "
              f"{'on ' + (glue.folder + ' (GLUE)') if glue else 'on a text corpus (general distillation)'}.", ""]

    lines += ["## Task", ""]
    if glue is not None:
        labels = ", ".join(f"{i} = `{n}`" for i, n in enumerate(glue.class_names))
        kind = "regression (one score)" if glue.is_regression else f"{glue.num_labels}-class classification"
        lines += [f"GLUE {glue.folder} (`{glue.name}`), {kind}: {labels}. Input: "
                  f"{' + '.join(glue.text_columns)}; trained with `data.max_length` {cfg['data'].get('max_length')}; "
                  f"the tokenizer truncates at the model's {max_tokens} positions (`model_max_length`).", ""]
    else:
        corpus = cfg.get("data", {}).get("corpus") or {}
        source = corpus.get("files") or corpus.get("dataset")
        lines += [f"Task-agnostic distillation on the corpus {source}; no labels: a general encoder for a task stage "
                  f"(`student.init`) or feature extraction. Loads with `{model_class}`.", ""]

    lines += ["## Dev metrics", ""]
    if scores:
        origin = "`metrics.json` (the run's final evaluation)" if final else "the evaluation this checkpoint recorded"
        lines += [f"From {origin}, at step {metrics.get('step', step)} (checkpoint `{tag}`)"
                  + (f", on the first {dev_limit} dev examples" if split_note else "") + ":", "", *_table(scores), ""]
        best = metrics.get("best")
        if final and isinstance(best, dict) and _scores(best) != scores:
            lines += [f"The run's best evaluation was at step {best.get('step')} ({_inline(_scores(best))}); "
                      "this export is the last step's model, not the best one.", ""]
    else:
        lines += [f"None recorded for checkpoint `{tag}` (no evaluation at step {step}); measure it with "
                  "`dskd evaluate --model <this folder> --config <the run's config.yaml>`.", ""]

    teacher = cfg.get("teacher") or {}
    source = teacher.get("path") or (f"a model built from `teacher.arch` {json.dumps(teacher.get('arch'))} "
                                     "(random initialisation)" if teacher.get("arch") else "(none)")
    if role == "finetune":
        lines += ["## Starting point", "", f"Fine-tuned from {_code(source)}.", ""]
    else:
        lines += ["## Teacher", "", f"Teacher: {_code(source)}" + (f", its outputs read from the cache {_code(info['teacher_cache'])}"
                                                          if info.get("teacher_cache") else "") + ".", ""]
        teacher_scores = _scores((metrics or {}).get("teacher"))
        if teacher_scores:
            lines += ["Teacher dev metrics (same dev set):", "", *_table(teacher_scores), ""]
        if (cfg.get("student") or {}).get("init"):
            lines += [f"The student started from `{cfg['student']['init']}` (`student.init`).", ""]
        layers = info.get("student_teacher_layers")
        if layers:
            lines += [f"Student layers initialised from teacher layers {layers}." if (cfg.get("student") or {}).get(
                "init_from_teacher") else f"Layer map (teacher layers): {layers}.", ""]

    lines += ["## Method", "", *_method(cfg, role), ""]

    params = sum(p.numel() for p in model.parameters())
    lines += ["## Model", "", "| | |", "|---|---|", f"| class | `{type(model).__name__}` (`{model_class}`) |",
              f"| parameters | {params:,} |", f"| layers | {getattr(config, 'num_hidden_layers', '?')} |",
              f"| hidden size | {getattr(config, 'hidden_size', '?')} |",
              f"| attention heads | {getattr(config, 'num_attention_heads', '?')} |",
              f"| intermediate size | {getattr(config, 'intermediate_size', '?')} |",
              f"| vocabulary | {getattr(config, 'vocab_size', '?')} |", ""]

    complete = run_dir / "checkpoints" / tag / checkpoint.COMPLETE
    written = _utc(complete.stat().st_mtime) if complete.is_file() else "unknown"
    now = _utc(datetime.datetime.now(datetime.timezone.utc).timestamp())
    lines += ["## Provenance", "", "The command that produced the run:", "", "```bash", _command(info), "```", "",
              f"- ranks: {info.get('world_size', '?')}, ZeRO stage {info.get('zero_stage', '?')}, "
              f"dtype {info.get('dtype', '?')}, DeepSpeed config `{info.get('deepspeed_config', '?')}`",
              f"- checkpoint `{tag}` (step {step}), written {written}; exported {now}",
              f"- dskd {dskd.__version__}, transformers {_version('transformers')}, torch {_version('torch')}", ""]
    lines += ["## Use", "", "```python", "from transformers import pipeline", "",
              f'model = pipeline("{pipeline_tag}", model="path/to/{name}")',
              'print(model("A text.", truncation=True))' if pipeline_tag != "fill-mask"
              else 'print(model(f"Paris is the {model.tokenizer.mask_token} of France."))', "```", ""]
    lines += ["<details><summary>The run's resolved config (config.yaml)</summary>", "", "```yaml",
              yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", "", "</details>", ""]
    return "\n".join(lines)


def _method(cfg: dict, role: str) -> list[str]:
    if role == "finetune":
        ft = cfg.get("finetune") or {}
        return ["Hard-label training: cross-entropy on the labels (MSE for a regression task), weight 1.0; "
                f"{ft.get('epochs')} epoch(s), batch {ft.get('batch_size')} per rank, lr {ft.get('lr')}."]
    training = cfg.get("training") or {}
    lines = ["| loss term | type | weight | settings |", "|---|---|---|---|"]
    for name, term in (cfg.get("losses") or {}).items():
        settings = {k: v for k, v in term.items() if k not in ("weight", "type")}
        lines.append(f"| {name} | {term.get('type') or name} | {term.get('weight')!r} | "
                     f"{_inline(settings) or '-'} |")
    lines.append("")
    for stage in cfg.get("schedule") or []:
        length = f"{stage.get('steps')} steps" if stage.get("steps") else f"{stage.get('epochs')} epoch(s)"
        weights = _inline(stage.get("losses") or {}) or "every term at its weight"
        lines.append(f"- stage `{stage.get('name')}` ({length}): {weights}")
    methods = _methods(cfg, role)
    if methods:
        lines.append(f"- run-level methods: {', '.join(methods)}")
    lines.append(f"- {training.get('epochs')} epoch(s)" + (f" (at most {training['max_steps']} steps)"
                                                          if training.get("max_steps") else "")
                 + f", batch {training.get('batch_size')} per rank x grad_accum {training.get('grad_accum')}, "
                 f"lr {training.get('lr')}, seed {cfg.get('seed')}")
    return lines


def _methods(cfg: dict, role: str) -> list[str]:
    from dskd.config import ExperimentConfig, build_dataclass
    from dskd.errors import DskdError

    try:
        experiment = build_dataclass(ExperimentConfig, cfg, "config.yaml")
        return [cls.name for cls in METHOD_REGISTRY.values() if cls.enabled(experiment, role)]
    except DskdError:  # a config of an older dskd: the card still names the loss terms
        return []


def _inline(values: dict) -> str:
    return ", ".join(f"{k}: {v!r}" if isinstance(v, float) else f"{k}: {v}" for k, v in values.items())


def _code(text: str) -> str:
    return text if text.startswith(("a model built", "(")) else f"`{text}`"


def _final_step(run_dir: Path):
    path = run_dir / METRICS_FILE
    return json.loads(path.read_text()).get("step", "?") if path.is_file() else "?"


def _utc(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"
