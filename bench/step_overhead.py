"""How thin is the engine? dskd's training step against a minimal hand-written PyTorch KD loop.

Both sides get the same frozen teacher, the same student (initialised from teacher
layers), the same batch and the same loss (0.5 CE + 0.5 T^2 KL, T=2), AdamW with
linear warmup/decay and gradient clipping. dskd runs its real ``training.module.train_step``
inside a DeepSpeed engine (1 process, CPU, ZeRO-0 fp32 by default); the baseline is a
plain loop over ``torch.optim.AdamW``.

Timings alternate between the two in rounds so both see the same machine load; the
result is the ratio of medians (dskd / plain). Prints one JSON object.

    python bench/step_overhead.py [--rounds 7] [--steps 5] [--batch 32] [--seq 128]
"""

from __future__ import annotations

import argparse
import statistics

from common import add_shape_args, emit, optimizer_step, timed  # sets the single-process CPU environment

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dskd import models
from dskd.training import engine as eng  # noqa: E402
from dskd.config import ArchConfig, StudentConfig, TrainingConfig  # noqa: E402
from dskd.losses import build_loss_terms  # noqa: E402
from dskd.training.module import DistillationModule, train_step
from dskd.training.stages import Stage, lr_factor
from dskd.teacher.online import TeacherSide  # noqa: E402

LOSSES = {"hard_ce": {"weight": 0.5}, "soft_kd": {"weight": 0.5, "temperature": 2.0}}
WEIGHTS = {"hard_ce": 0.5, "soft_kd": 0.5}


def make_models(args):
    arch = ArchConfig(layers=args.teacher_layers, hidden=args.hidden, heads=args.heads, intermediate=4 * args.hidden)
    teacher = models.build_from_arch(arch, 30522, 2, 0, seed=0, key="teacher.arch")
    student, _ = models.build_student(StudentConfig(layers=args.student_layers), teacher, 2, 0, seed=0)
    teacher = models.freeze(teacher, torch.float32, torch.device("cpu"))
    return teacher, student


def make_batch(args):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    mask[args.batch // 2 :, args.seq // 2 :] = 0  # some padding, as real batches have
    ids = ids * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.randint(0, 2, (args.batch,), generator=g)}


def plain_loop(teacher, student, batch, training: TrainingConfig, total_steps: int):
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(eng.param_groups(student, training.weight_decay), lr=training.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(training.warmup_ratio * total_steps), total_steps)
    inputs = models.model_inputs(batch)
    student.train()

    def step():
        with torch.no_grad():
            zt = teacher(**inputs).logits
        zs = student(**inputs).logits
        t = 2.0
        kd = F.kl_div(F.log_softmax(zs / t, -1), F.log_softmax(zt / t, -1), reduction="batchmean", log_target=True)
        loss = 0.5 * F.cross_entropy(zs, batch["labels"]) + 0.5 * kd * t * t
        loss.backward()
        optimizer_step(student, optimizer, scheduler, training.max_grad_norm)
        return loss

    return step


def dskd_loop(teacher, student, batch, training: TrainingConfig, total_steps: int, ds_path: str):
    ds, _ = eng.load_ds_config(ds_path, training)
    module = DistillationModule(student, build_loss_terms(LOSSES), frozenset({"logits"}))
    stages = [Stage("train", 0, total_steps, WEIGHTS)]
    engine = eng.initialize(module, ds, training, lambda step: lr_factor(step, stages, training))
    engine.train()
    teacher_side = TeacherSide(teacher)

    def step():
        return train_step(engine, teacher_side, batch, WEIGHTS)[0]

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(parser, rounds=7, steps=5, warmup=3, hidden=256, heads=4)
    parser.add_argument("--deepspeed", default="ds_configs/zero0_fp32.json")
    args = parser.parse_args()

    eng.init_distributed()
    torch.manual_seed(0)
    training = TrainingConfig(batch_size=args.batch, lr=1e-4)
    total_steps = args.rounds * args.steps + args.warmup + 10
    teacher, student_plain = make_models(args)
    _, student_dskd = make_models(args)
    batch = make_batch(args)
    plain = plain_loop(teacher, student_plain, batch, training, total_steps)
    dskd = dskd_loop(teacher, student_dskd, batch, training, total_steps, args.deepspeed)

    for _ in range(args.warmup):
        plain(), dskd()
    plain_times, dskd_times = [], []
    for i in range(args.rounds):
        # Alternate which goes first so drift in machine load hits both equally.
        order = [(plain, plain_times), (dskd, dskd_times)]
        for step, sink in order if i % 2 == 0 else reversed(order):
            sink.append(timed(step, args.steps))
    # Same start, same data, same optimizer: the two losses should agree closely.
    loss_plain, loss_dskd = plain().item(), dskd().item()
    result = {
        "benchmark": "step_overhead",
        "ratio_dskd_over_plain": statistics.median(dskd_times) / statistics.median(plain_times),
        "plain_step_ms_median": 1000 * statistics.median(plain_times),
        "dskd_step_ms_median": 1000 * statistics.median(dskd_times),
        "plain_step_ms": [round(1000 * t, 2) for t in plain_times],
        "dskd_step_ms": [round(1000 * t, 2) for t in dskd_times],
        "final_loss_plain": loss_plain,
        "final_loss_dskd": loss_dskd,
    }
    emit(result, args)


if __name__ == "__main__":
    main()
