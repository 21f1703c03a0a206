"""The training loop, shared by ``dskd finetune`` (teacher, hard labels) and ``dskd distill``.

It runs a prepared ``Job`` (``dskd.training.job``): the schedule's stages, evaluation,
checkpoints and preemption. What a method adds reaches it only through the declared hooks:
``LossTerm`` hooks for loss terms and ``Method`` hooks for run-level plugins
(``dskd.methods.base`` lists them and when they are called).
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from dskd import data
from dskd.config import to_dict
from dskd.errors import DskdError
from dskd.losses import AttentionKL
from dskd.training import checkpoint, rescale, throughput
from dskd.training import engine as eng
from dskd.training.evaluation import (
    attention_snapshot, evaluate, evaluate_student, format_metrics, held_out_loss, keep_stage_best, mean_over_ranks,
    restore_stage_best, teacher_held_out,
)
from dskd.training.job import Job
from dskd.training.module import DistillationModule, train_step
from dskd.training.monitor import Monitor
from dskd.training.preemption import EXIT_PREEMPTED, StopRequest
from dskd.training.run_dir import CONFIG_FILE, METRICS_FILE, PREDICTIONS_FILE, RUN_FILE, discard_replaced, init_output_dir, set_status, write_json
from dskd.training.stages import Stage, lr_factor, plan_stages, refresh_lr, shorten_stage, stage_pairs


NONFINITE_FP16_STREAK = 10


@dataclass
class StepContext:
    """What ``LossTerm.before_micro_step`` is told about the micro-step about to run."""

    job: Job
    engine: object
    stage: Stage
    step: int  # the optimizer step (0-based) this micro-step belongs to
    micro: int  # its micro-step, 0 .. grad_accum - 1
    tokenizer: object  # the run's tokenizer: what terms collate extra batches with


@dataclass
class RunView:
    """What ``Method`` hooks see of the running job."""

    job: Job
    engine: object
    monitor: Monitor
    stages: list[Stage]
    state: dict
    eval_batch: int

    @property
    def step(self) -> int:
        return self.state["step"]

    @property
    def end(self) -> int:
        return self.stages[-1].end

    def evaluate_teacher(self) -> dict[str, float]:
        """The current teacher's dev metrics (every rank takes part); a corpus job's: its held-out
        masked-LM metrics, where it has a head."""
        job = self.job
        if job.task.prediction is None:
            return teacher_held_out(job, self.eval_batch)
        return evaluate(lambda b: job.teacher.outputs(b, frozenset({"logits"}), (), "dev")["logits"], job.dev_set,
                        job.task, job.tokenizer, self.eval_batch, job.device)

    def export(self, dest, tag: str, final_metrics: dict | None = None) -> None:
        """Export checkpoint ``tag`` of this run as a Hugging Face folder ``dest`` (rank 0 only);
        ``final_metrics``: the run's result, when this is its final model."""
        from dskd.training.export import export_run

        # The checkpoint just written; the folder is the run's own (a resumed run's replaces its earlier export).
        export_run(self.job.out, dest, tag, verify=False, final_metrics=final_metrics, overwrite=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(job: Job, argv: list[str], stop: StopRequest | None = None) -> dict:
    """Train; return the final metrics (with ``halted: true`` when stopped by halt_after_steps,
    ``preempted: true`` on a scheduler signal). ``stop``: the signal handler, installed by the
    caller before start-up so that a signal then is a clean stop too; signals that arrive after
    the last step are ignored, and the run finishes."""
    cfg, training, task, out = job.cfg, job.training, job.task, job.out
    rank, world = eng.rank(), eng.world_size()

    lengths = data.example_lengths(job.train_set) if training.group_by_length else None
    if lengths is not None:
        job.notes.append(data.grouping_note(lengths, cfg.seed, rank, world, training.batch_size, training.grad_accum,
                                            training.group_by_length_megabatch))
    batches_0 = data.epoch_batches(len(job.train_set), 0, cfg.seed, rank, world, training.batch_size,
                                   training.grad_accum, lengths, training.group_by_length_megabatch)
    steps_per_epoch = len(batches_0) // training.grad_accum
    if steps_per_epoch == 0:
        raise DskdError(
            f"the training set has {len(job.train_set)} examples, fewer than one optimizer step needs "
            f"({world} ranks x training.batch_size {training.batch_size} x training.grad_accum "
            f"{training.grad_accum}); lower the batch size or use more data (data.train_limit)"
        )
    mapped_layers = [s for s, _ in job.pairs]
    stages = plan_stages(cfg.schedule if job.role == "distill" else [], job.losses, training, steps_per_epoch,
                         mapped_layers)
    if job.resume_tag is not None and (out / METRICS_FILE).is_file():
        status = json.loads((out / RUN_FILE).read_text()).get("status")
        if status == "completed":
            if rank == 0:
                print(f"{out} already completed; nothing to resume", file=sys.stderr)
            return json.loads((out / METRICS_FILE).read_text())

    init_output_dir(job, argv)
    seed_everything(cfg.seed + rank)
    module = DistillationModule(job.model, job.terms, job.needs, job.student_capture)
    engine = eng.initialize(module, job.ds_config, training, lambda step: lr_factor(step, stages, training, job.methods))
    params = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    space = checkpoint.check_free_space(out, params, job.dtype, job.zero_stage, training.keep_checkpoints)
    if space and rank == 0:
        print(space, file=sys.stderr, flush=True)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "teacher_metrics": None,
             "stage_bounds": [[st.start, st.end] for st in stages], "plateau": None,
             "epoch_offset": 0}  # examples of this epoch's order used before a change of world size
    for method in job.methods:
        method.bind_engine(engine)
    if job.resume_tag is not None:
        if job.resume_world is None:
            state.update(checkpoint.load(engine, out / "checkpoints", job.resume_tag))
        else:  # written by another number of ranks
            state.update(rescale.load(engine, out / "checkpoints", job.resume_tag, job.resume_world,
                                      training.batch_size))
        for method in job.methods:
            method.load_state(out / "checkpoints" / job.resume_tag)
        # Plateau rules may have ended stages early; the checkpoint holds where they really ended.
        for st, (start, end) in zip(stages, state["stage_bounds"], strict=True):
            st.start, st.end = start, end

    eval_batch = training.batch_size * 2
    monitor = Monitor(out / "tensorboard", rank == 0, stages[-1].end, state["step"], job.role, training.progress,
                      training.log_every_seconds)
    monitor.start_session(to_dict(cfg), (out / CONFIG_FILE).read_text() if rank == 0 else "", job.role, argv, world,
                          task, list(job.terms), sorted({k.split("/")[0] for k in _layer_tags(job)}))
    try:
        return _train(job, engine, monitor, stages, state, eval_batch, steps_per_epoch, lengths, stop)
    except BaseException:
        monitor.end_session(succeeded=False)
        raise
    finally:
        monitor.close()


def _layer_tags(job: Job) -> list[str]:
    """``term/L<s>`` for every layer-wise term's per-layer part (what the layout overlays)."""
    from dskd.losses import LayerwiseTerm

    return [f"{name}/L{s}" for name, term in job.terms.items() if isinstance(term, LayerwiseTerm)
            for s, _ in job.pairs]


def _train(job: Job, engine, monitor: Monitor, stages: list[Stage], state: dict, eval_batch: int,
           steps_per_epoch: int, lengths, stop: StopRequest | None) -> dict:
    """The steps, evaluations and checkpoints of :func:`run` (``lengths``: the examples' token
    counts with ``training.group_by_length``, else None)."""
    cfg, training, task, out = job.cfg, job.training, job.task, job.out
    rank, world = eng.rank(), eng.world_size()
    device = eng.device()
    view = RunView(job, engine, monitor, stages, state, eval_batch)
    if job.teacher is not None and state["teacher_metrics"] is None:
        state["teacher_metrics"] = view.evaluate_teacher()
    _announce(job, view, steps_per_epoch)

    attention_terms = [t for name, t in job.terms.items() if isinstance(t, AttentionKL)]
    snapshot_example = None
    if attention_terms and training.attention_images and job.teacher is not None:
        row = data.collate([job.dev_set[0]], job.tokenizer)
        snapshot_example = {k: v.to(device) for k, v in row.items()}
        snapshot_tokens = job.tokenizer.convert_ids_to_tokens(row["input_ids"][0].tolist())
    held_out: dict[int, list[dict]] = {}  # plateau.batches -> the first dev batches

    def stage_at(step: int) -> Stage:
        return next(st for st in stages if st.start <= step < st.end)

    def save() -> None:
        # A finite loss can still be followed by an update to inf/NaN weights: never checkpoint
        # those (ZeRO-3 parameters are checked on their local partition).
        finite = torch.stack([torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in engine.module.parameters()])
        if stop.agreed(device, ~finite.all())[1]:
            _non_finite({}, state, out, "the weights are not finite after step")
        state["stage_bounds"] = [[st.start, st.end] for st in stages]

        def save_methods(folder) -> None:
            for method in job.methods:
                method.save_state(folder)

        tag = checkpoint.save(engine, out / "checkpoints", state["step"], {"dskd": dict(state)},
                              training.keep_checkpoints, save_methods if job.methods else None)
        discard_replaced(out)
        for method in job.methods:
            method.after_save(view, tag)

    sums: dict[str, torch.Tensor] = {}
    grad_norm = None  # the last optimizer step's (a device tensor until it is logged)
    log_now = False  # the clock asked for a log line (every rank agrees, after a step)
    step_total, streak = 0.0, 0  # this step's loss; optimizer steps in a row with a non-finite loss
    micro_count = tokens = 0  # micro-steps and real tokens of this rank since the last log
    flops_per_token = throughput.flops_per_token(job)
    window_start, window_steps = time.perf_counter(), 0
    samples_per_step = world * training.batch_size * training.grad_accum
    last_save_step = -1
    current_stage = stage_at(state["step"]).name if state["step"] < stages[-1].end else None
    entered = None  # the stage whose `Method.on_stage` hooks have run
    halted = preempted = False
    predictions_written = False  # the final evaluation wrote dev_predictions.jsonl for the weights that are exported
    stop = stop or StopRequest()
    engine.train()
    if state["step"] < stages[-1].end and stop.agreed(device)[0]:  # a signal during start-up: nothing to save
        preempted = True

    monitor.begin_training()
    while state["step"] < stages[-1].end and not halted and not preempted:
        batches = data.epoch_batches(len(job.train_set), state["epoch"], cfg.seed, rank, world,
                                     training.batch_size, training.grad_accum, lengths,
                                     training.group_by_length_megabatch, skip=state["epoch_offset"])
        loader = data.loader(job.train_set, batches[state["batch_in_epoch"] :], job.tokenizer,
                             task.collator(job.tokenizer, state["epoch"]))
        for batch in loader:
            stage = stage_at(state["step"])
            if stage.name != current_stage:
                monitor.line(f"[stage] step {state['step']}: {current_stage} -> {stage.name}")
                monitor.text("stage", f"step {state['step']}: {current_stage} -> {stage.name}", state["step"])
                current_stage = stage.name
            if stage.name != entered:
                for method in job.methods:
                    method.on_stage(view, stage)
                entered = stage.name
            batch = {k: v.to(device) for k, v in batch.items()}
            engine.module.set_progress(stage.progress(state["step"]))
            context = StepContext(job, engine, stage, state["step"], state["batch_in_epoch"] % training.grad_accum,
                                  job.tokenizer)
            for name in stage.weights:  # per-step work of terms beside their loss (`LossTerm.before_micro_step`)
                batch = engine.module.terms[name].before_micro_step(context, batch)
            upcoming = state["step"] + 1  # the optimizer step this micro-step belongs to, 1-based
            logged = upcoming % training.log_every == 0 or upcoming == stages[-1].end or monitor.line_due()
            total, values, norm = train_step(engine, job.teacher, batch, stage.weights,
                                             stage_pairs(stage, job.pairs), grad_norm=logged)
            grad_norm = norm if norm is not None else grad_norm
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            sums["total"] = sums.get("total", 0.0) + total.detach().float()
            step_total = step_total + total.detach().float()  # this optimizer step's micro-steps only
            tokens = tokens + batch["attention_mask"].sum()  # a tensor: no device sync per micro-step
            micro_count += 1
            state["batch_in_epoch"] += 1
            if state["batch_in_epoch"] % training.grad_accum:
                continue

            # One collective per optimizer step, before anything is evaluated or saved: a NaN/inf
            # loss on any rank, and a scheduler signal on any rank. (DeepSpeed's ZeRO optimizers skip
            # a step whose gradients are not finite, in fp32 too, so without this a diverged run
            # would "complete".) fp16 overflows now and then while its loss scale settles: there
            # only a streak of NONFINITE_FP16_STREAK steps stops the run.
            signalled, not_finite, log_now = stop.agreed(device, ~torch.isfinite(torch.as_tensor(step_total)),
                                                         monitor.line_due())
            step_total = 0.0
            streak = streak + 1 if not_finite else 0
            if streak >= (NONFINITE_FP16_STREAK if job.dtype == torch.float16 else 1):
                _non_finite(sums, state, out)
            state["step"] += 1
            window_steps += 1
            step = state["step"]
            end_of_epoch = state["batch_in_epoch"] == len(batches)
            if end_of_epoch:
                state["epoch"] += 1
                state["batch_in_epoch"] = state["epoch_offset"] = 0
            monitor.advance()
            for method in job.methods:
                method.after_step(view, step)

            if step % training.log_every == 0 or step == stages[-1].end or log_now:
                names = sorted(sums)
                means = mean_over_ranks([float(sums[n]) / micro_count for n in names] + [float(tokens)])
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                losses = dict(zip(names, means[:-1], strict=True))
                scalars = {f"train/loss/{n}": v for n, v in losses.items()}
                scalars["train/lr"] = engine.get_lr()[0]
                norm = float(grad_norm) if grad_norm is not None else None  # identical on every rank
                if norm is not None:
                    scalars["train/grad_norm"] = norm
                scalars["train/epoch"] = epoch = step / steps_per_epoch
                scalars["train/samples_per_s"] = window_steps * samples_per_step / elapsed
                scalars.update(throughput.scalars(means[-1] * world / elapsed, flops_per_token, device, job.dtype))
                scalars["train/stage"] = float(stages.index(stage))
                monitor.scalars(scalars, step)
                monitor.train_progress(step, epoch, losses, scalars["train/lr"], norm, scalars["train/samples_per_s"],
                                       means[-1] * world / elapsed)
                sums, micro_count, tokens = {}, 0, 0
                window_start, window_steps = time.perf_counter(), 0

            if stage.plateau is not None and step < stage.end and (step - stage.start) % stage.plateau.every == 0:
                _check_plateau(view, stage, held_out)

            finished = step == stages[-1].end
            halting = training.halt_after_steps is not None and step == training.halt_after_steps and not finished
            if (training.eval_every and step % training.eval_every == 0) or (
                not training.eval_every and end_of_epoch
            ) or finished or (stage.keep_best and step == stage.end):
                predictions_written = finished and task.prediction is not None
                result, about = _evaluate(engine, job, eval_batch, out / PREDICTIONS_FILE if predictions_written else None)
                monitor.scalars({f"eval/{k}": v for k, v in about.items()}, step)
                main = result[task.main_metric]
                if state["best"] is None or main > state["best"][task.main_metric]:
                    state["best"] = dict(result, step=step)
                monitor.scalars({f"eval/{k}": v for k, v in result.items()}, step)
                monitor.line(
                    f"[eval] step {step}/{stages[-1].end} epoch {step / steps_per_epoch:.2f} "
                    f"{task.name}: {format_metrics(result)}"
                    + (f" loss={about['loss']:.4f}" if "loss" in about and "loss" not in result else "")
                    + f" (best {task.main_metric}={state['best'][task.main_metric]:.4f} at step "
                    f"{state['best']['step']}; {about['seconds']:.1f}s)"
                )
                state["last_eval"] = dict(result, step=step)
                if stage.keep_best:
                    keep_stage_best(engine, out, state, stages.index(stage), result, task.main_metric, step,
                                    monitor)
                    if step == stage.end:
                        restore_stage_best(engine, out, state, stage, task.main_metric, monitor)
                        predictions_written = False  # other weights now: the end predicts again
                if snapshot_example is not None:
                    attention_snapshot(engine, job.teacher, snapshot_example, job.pairs, attention_terms[0].groups,
                                       training.attention_images, monitor, step, snapshot_tokens)
            if (training.save_every and step % training.save_every == 0) or (
                not training.save_every and end_of_epoch
            ) or finished or halting:
                save()
                last_save_step = step
            if finished:
                break
            if halting:
                halted = True
                break
            if signalled:  # a scheduler signal on any rank: checkpoint this step and leave
                if last_save_step != step:
                    save()
                    last_save_step = step
                preempted = True
                break
    if preempted:
        set_status(out, "preempted")
        if rank == 0:
            where = f"checkpoint at step {state['step']}" if last_save_step == state["step"] else \
                f"stopped before training (step {state['step']}), no new checkpoint"
            print(f"[preempt] {stop.name()}: {where}; exiting with code "
                  f"{EXIT_PREEMPTED} so the job is requeued (continue with --auto-resume or --resume)",
                  file=sys.stderr, flush=True)
        return {"preempted": True, "step": state["step"]}

    if halted:
        set_status(out, "halted")
        if rank == 0:
            print(f"halted after step {state['step']} (training.halt_after_steps); continue with --resume",
                  file=sys.stderr)
        return {"halted": True, "step": state["step"]}

    if last_save_step != state["step"]:
        save()
    if task.prediction is not None and not predictions_written:  # after a restore, or resumed past the last eval
        _evaluate(engine, job, eval_batch, out / PREDICTIONS_FILE)
    final = {k: v for k, v in state["last_eval"].items() if k != "step"}
    result = {"task": task.name, **final, "step": state["step"], "best": state["best"]}
    if state["teacher_metrics"]:
        result["teacher"] = {"task": task.name, **state["teacher_metrics"]}
    if rank == 0:
        view.export(out / "model", None, result)
        write_json(out / METRICS_FILE, result)
    set_status(out, "completed")
    monitor.end_session(succeeded=True)
    eng.barrier()
    return result


def _evaluate(engine, job, eval_batch: int, predictions_to=None):
    """The student's dev evaluation, in eval mode and inside every method's ``evaluating()``
    (where a method may put other weights in place, e.g. a running average)."""
    engine.eval()
    with contextlib.ExitStack() as evaluating:
        for method in job.methods:
            evaluating.enter_context(method.evaluating())
        result = evaluate_student(engine, job, eval_batch, predictions_to)
    engine.train()
    return result


def _non_finite(values: dict, state: dict, out, what: str = "the loss is not finite at step") -> None:
    """Stop before NaN/inf weights reach a checkpoint: the newest checkpoint stays the last good one."""
    bad = [name for name, value in values.items() if not torch.isfinite(value).all()]
    newest = checkpoint.latest_tag(out / "checkpoints")
    step = state["step"] + (1 if values else 0)
    raise DskdError(
        f"{what} {step}" + (f" (term(s): {', '.join(bad)})" if bad else "") + "; "
        f"the run stops, and its newest checkpoint ({newest or 'none yet'}) is kept. Lower training.lr, check "
        "the loss weights and the data, or use bf16 instead of fp16; then --resume (or start again)"
    )


def _announce(job: Job, view: RunView, steps_per_epoch: int) -> None:
    """The run's opening log lines: teacher, data, methods, stages, and where a resume picked up."""
    monitor, state, stages = view.monitor, view.state, view.stages
    if job.cached:
        monitor.line(f"[teacher] outputs read from the cache {job.teacher.path}; no teacher model is loaded")
    if state["teacher_metrics"]:
        monitor.line(f"[teacher] dev {job.task.name}: {format_metrics(state['teacher_metrics'])}")
        monitor.scalars({f"teacher/{k}": v for k, v in state["teacher_metrics"].items()}, 0)
    describe = ", ".join(
        f"{st.name}[{st.start}:{st.end}]({'+'.join(st.weights)}"
        + (f" layers {','.join(map(str, st.layers))}" if st.layers is not None and job.pairs else "")
        + (" until plateau" if st.plateau else "") + ")"
        for st in stages
    )
    for line in job.notes + [line for method in job.methods for line in method.describe(job)]:
        monitor.line(line)
    monitor.line(
        f"[{job.role}] {len(job.train_set)} train / {len(job.dev_set)} {job.task.units}, "
        f"{eng.describe_batch(job.training, eng.world_size(), 'finetune' if job.role == 'finetune' else 'training')}, "
        f"{steps_per_epoch} steps/epoch, {stages[-1].end} steps, stages: {describe}"
        + (f", layer map (student, teacher): {list(job.pairs)}" if job.pairs else "")
    )
    if job.resume_tag is not None:
        # Say so: a requeued job (--auto-resume) otherwise looks like a fresh start in its log.
        monitor.line(f"[resume] continuing from checkpoint {job.resume_tag} at step {state['step']} "
                     f"of {stages[-1].end} (epoch {state['epoch']})")


def _check_plateau(view: RunView, stage: Stage, held_out: dict) -> None:
    """A plateau rule's check: the stage's held-out loss; end the stage when it stopped improving."""
    job, state, stages, step = view.job, view.state, view.stages, view.step
    count = stage.plateau.batches
    if count not in held_out:
        held_out[count] = data.first_batches(job.dev_set, job.training.batch_size, count, job.tokenizer,
                                             job.device, job.task.collator(job.tokenizer, -1))
    loss = held_out_loss(view.engine, job.teacher, held_out[count], stage, job.pairs)
    index = stages.index(stage)
    track = state["plateau"] if state["plateau"] and state["plateau"]["stage"] == index else None
    if track is None or loss < track["best"] - stage.plateau.min_delta:
        track = {"stage": index, "best": loss, "bad": 0}
    else:
        track["bad"] += 1
    state["plateau"] = track
    view.monitor.scalars({f"plateau/{stage.name}": loss}, step)
    if track["bad"] >= stage.plateau.patience:
        view.monitor.line(f"[plateau] {stage.name}: held-out loss {loss:.4f} has not improved on "
                          f"{track['best']:.4f} for {track['bad']} check(s); next stage at step {step}")
        shorten_stage(stages, index, step)
        view.monitor.set_total(stages[-1].end)
        refresh_lr(view.engine)
