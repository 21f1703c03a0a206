"""Evaluations during a run: dev metrics over every rank's shard, the held-out loss of a
plateau rule, attention snapshots for TensorBoard, and a ``keep_best`` stage's best weights."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from dskd import data, models
from dskd.kernels.vocab import vocab_loss
from dskd.runtime import dist
from dskd.training import checkpoint
from dskd.training.module import losses_on
from dskd.training.run_dir import STAGE_BEST_DIR
from dskd.training.stages import Stage, stage_pairs


def evaluate(forward, dataset, task, tokenizer, batch_size: int, device) -> dict[str, float]:
    """Every rank scores its shard with ``forward(batch)`` (the task's prediction, e.g. the
    logits); all ranks get the task's metrics over the whole set."""
    return task.score(*predict(forward, dataset, task, tokenizer, batch_size, device))


def predict(forward, dataset, task, tokenizer, batch_size: int, device):
    """(predictions, labels) of the whole set as numpy arrays in dataset order, on every rank;
    each rank runs ``forward`` on its shard."""
    idx, predictions, labels = [], [], []
    with torch.no_grad():
        for batch in data.eval_loader(dataset, tokenizer, batch_size, dist.rank(), dist.world_size()):
            batch = {k: v.to(device) for k, v in batch.items()}
            predictions.append(forward(batch).float().cpu())
            idx.append(batch["idx"].cpu())
            labels.append(batch["labels"].cpu())
    local = (
        torch.cat(idx) if idx else torch.empty(0, dtype=torch.long),
        torch.cat(predictions) if predictions else torch.empty(0, task.num_labels),
        torch.cat(labels) if labels else torch.empty(0),
    )
    parts = [local]
    if dist.world_size() > 1:
        parts = [None] * dist.world_size()
        torch.distributed.all_gather_object(parts, local)
    order = torch.argsort(torch.cat([p[0] for p in parts]))
    return torch.cat([p[1] for p in parts])[order].numpy(), torch.cat([p[2] for p in parts])[order].numpy()


def write_predictions(path: Path, task, predictions, labels) -> None:
    """One JSON line per dev example, in dataset order: its ``row``, the gold ``label``, the
    ``predicted`` label (the value itself for a regression) and the raw ``output`` (logits), so
    per-example analyses (a paired test between two runs) need no rerun."""
    lines = []
    for row, (output, label) in enumerate(zip(predictions.tolist(), labels.tolist(), strict=True)):
        output = output if isinstance(output, list) else [output]
        predicted = output[0] if task.is_regression else max(range(len(output)), key=output.__getitem__)
        lines.append(json.dumps({"row": row, "label": label, "predicted": predicted, "output": output}))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def dev_loss(task, predictions, labels) -> float:
    """The student's own loss on the dev labels: cross-entropy, or the squared error of a
    regression task (what HF Trainer reports as ``eval_loss``)."""
    predictions, labels = torch.as_tensor(predictions, dtype=torch.float32), torch.as_tensor(labels)
    if task.is_regression:
        return float(torch.nn.functional.mse_loss(predictions.reshape(-1), labels.float().reshape(-1)))
    return float(torch.nn.functional.cross_entropy(predictions, labels.long()))


def evaluate_student(engine, job, batch_size: int, predictions_to: Path | None = None
                     ) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, about): the student's dev metrics: the task's score of its predictions, or, for
    a corpus job (no prediction), its held-out losses (:func:`held_out_terms`); ``about``: its
    dev ``loss`` (tasks with labels), and the evaluation's ``seconds`` and ``examples_per_s``.
    ``predictions_to``: also write the predictions there (rank 0; :func:`write_predictions`)."""
    task = job.task
    start = time.perf_counter()
    about = {}
    if task.prediction is not None:
        predictions, labels = predict(lambda b: engine(b)[task.prediction], job.dev_set, task, job.tokenizer,
                                      batch_size, job.device)
        metrics = task.score(predictions, labels)
        about["loss"] = dev_loss(task, predictions, labels)
        if predictions_to is not None and dist.rank() == 0:
            write_predictions(predictions_to, task, predictions, labels)
    else:
        metrics = held_out_terms(engine, job, batch_size)
    seconds = time.perf_counter() - start
    about.update(seconds=seconds, examples_per_s=len(job.dev_set) / max(seconds, 1e-9))
    return metrics, about


def held_out_terms(engine, job, batch_size: int) -> dict[str, float]:
    """Every loss term on the held-out blocks (fixed masks), each rank its share: ``loss/<term>``,
    the weighted total ``loss`` (configured weights; a term only on in stages counts 1) and
    ``neg_loss``; masked-LM terms add ``mlm_accuracy`` and ``mlm_ce`` over the masked tokens."""
    weights = {name: float(spec["weight"]) or 1.0 for name, spec in job.losses.items()}
    collate_fn = job.task.collator(job.tokenizer, -1)
    sums: dict[str, float] = {}
    count = 0.0
    with torch.no_grad():
        for batch in data.eval_loader(job.dev_set, job.tokenizer, batch_size, dist.rank(), dist.world_size(),
                                      collate_fn):
            batch = {k: v.to(job.device) for k, v in batch.items()}
            _, values = losses_on(engine, job.teacher, batch, dict.fromkeys(weights, 1.0), job.pairs, "dev")
            rows = float(len(batch["input_ids"]))
            count += rows
            for key, value in values.items():
                if "/L" in key:  # per-layer parts: logged in training, not needed here
                    continue
                masked = f"{key.split('/')[0]}/masked"
                weight = float(values[masked]) if key.endswith(("/accuracy", "/ce")) and masked in values else rows
                sums[key] = sums.get(key, 0.0) + float(value) * weight
                sums[f"{key}#w"] = sums.get(f"{key}#w", 0.0) + weight
    keys = sorted(k for k in sums if not k.endswith("#w"))
    totals = _sum_over_ranks([sums[k] for k in keys] + [sums[f"{k}#w"] for k in keys] + [count])
    means = {k: totals[i] / max(totals[len(keys) + i], 1e-12) for i, k in enumerate(keys)}
    result = {f"loss/{k}": v for k, v in means.items() if "/" not in k}
    result["loss"] = sum(weights[name] * means[name] for name in weights if name in means)
    result["neg_loss"] = -result["loss"]
    for name in weights:
        if f"{name}/accuracy" in means:
            result["mlm_accuracy"] = means[f"{name}/accuracy"]
            result["mlm_ce"] = means[f"{name}/ce"]
    return result


def teacher_held_out(job, batch_size: int) -> dict[str, float]:
    """A corpus job's teacher on the held-out blocks: its masked-LM accuracy and CE at the masked
    tokens (the bar for the student's ``mlm_accuracy``); empty without masked-LM terms or head."""
    model = getattr(job.teacher, "model", None)
    if not getattr(job.task, "mlm", False) or model is None:
        return {}
    transform, weight, bias = models.mlm_head(model, "teacher")
    ce = correct = count = 0.0
    with torch.no_grad():
        for batch in data.eval_loader(job.dev_set, job.tokenizer, batch_size, dist.rank(), dist.world_size(),
                                      job.task.collator(job.tokenizer, -1)):
            batch = {k: v.to(job.device) for k, v in batch.items()}
            hidden = models.teacher_outputs(model, batch, frozenset({"last_hidden"}))["last_hidden"]
            masked = batch["labels"] != -100
            _, means = vocab_loss(transform(hidden[masked]), weight, bias, batch["labels"][masked])
            m = float(masked.sum())
            ce, correct, count = ce + float(means[0]) * m, correct + float(means[2]) * m, count + m
    ce, correct, count = _sum_over_ranks([ce, correct, count])
    return {"mlm_accuracy": correct / max(count, 1.0), "mlm_ce": ce / max(count, 1.0)}


def _sum_over_ranks(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=dist.device())
    if dist.world_size() > 1:
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def format_metrics(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items())


def mean_over_ranks(values: list[float]) -> list[float]:
    # On the run's device: NCCL reduces only CUDA tensors.
    tensor = torch.tensor(values, dtype=torch.float64, device=dist.device())
    if dist.world_size() > 1:
        torch.distributed.all_reduce(tensor)
        tensor /= dist.world_size()
    return tensor.tolist()


def held_out_loss(engine, teacher, batches: list[dict], stage: Stage, pairs) -> float:
    """A stage's weighted loss on fixed dev batches, without dropout: the plateau signal."""
    engine.eval()
    with torch.no_grad():
        total = sum(float(losses_on(engine, teacher, b, stage.weights, stage_pairs(stage, pairs), "dev")[0])
                    for b in batches)
    engine.train()
    return mean_over_ranks([total / len(batches)])[0]


def attention_snapshot(engine, teacher, example: dict, pairs, groups, heads: int, monitor, step,
                       tokens: list[str]) -> None:
    """Draw teacher | student attention of every mapped layer for one dev example (rank 0 writes;
    every rank runs the forward, which ZeRO-3 needs). ``tokens``: the example's, for the axes."""
    engine.eval()
    with torch.no_grad():
        student = engine(example, pairs=pairs)
        target = teacher.outputs(example, engine.module.needs, pairs, "dev")
    engine.train()
    for (s, t), s_qk, t_qk in zip(pairs, student["attention_qk"], target["attention_qk"], strict=True):
        monitor.attention_image(f"attention/student_L{s}_teacher_L{t}", s_qk, t_qk, example["attention_mask"],
                                groups, heads, step, tokens, (s, t))


def keep_stage_best(engine, out: Path, state: dict, index: int, result: dict, metric: str, step: int,
                    monitor) -> None:
    """After an evaluation in a ``keep_best`` stage: checkpoint the student when it beats the
    stage's best so far (one such checkpoint is kept, beside the run's own checkpoints so
    their rotation never removes it)."""
    tracked = state.get("stage_best")
    if tracked is not None and tracked["stage"] == index and result[metric] <= tracked["result"][metric]:
        return
    checkpoint.save(engine, out / STAGE_BEST_DIR, step, {"dskd": {"stage": index}}, keep=1)
    state["stage_best"] = {"stage": index, "step": step, "tag": checkpoint.tag_for(step), "result": dict(result)}
    monitor.line(f"[keep_best] step {step}: new best of the stage ({metric}={result[metric]:.4f}) checkpointed")


def restore_stage_best(engine, out: Path, state: dict, stage: Stage, metric: str, monitor) -> None:
    """End of a ``keep_best`` stage: load the weights and optimizer state of its best
    evaluation. The LR schedule and the step counter go on (they are not restored), and
    the run's RNG streams are left alone, so an interrupted run resumes to the same result."""
    best = state["stage_best"]
    if best["step"] != stage.end:
        engine.load_checkpoint(str(out / STAGE_BEST_DIR), tag=best["tag"], load_optimizer_states=True,
                               load_lr_scheduler_states=False)
    state["last_eval"] = dict(best["result"], step=stage.end)
    monitor.line(f"[keep_best] {stage.name} ended at step {stage.end}; continuing from its best weights, "
                 f"step {best['step']} ({metric}={best['result'][metric]:.4f})")
    monitor.text("stage", f"{stage.name}: best weights of step {best['step']} restored", stage.end)
