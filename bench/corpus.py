"""Corpus (task-agnostic) distillation: dskd's step against a minimal hand-written PyTorch loop
with the same losses, in tokens/s; and the peak memory of one dskd step at S=512 with the
fused kernels against the naive formulas.

Both sides get the same frozen teacher with a masked-LM head, the same student (its layers 2,
4, 6 -> 1, 2, 3 copied from the teacher), the same masked corpus blocks (WikiText-2 sample
shipped in dskd, packed and masked by ``dskd.data.corpus``), dropout 0 (so the two compute the
same numbers), AdamW with linear warmup/decay and gradient clipping, and the losses

    mlm_kd (T=2, hard_weight 0.5) + hidden_cosine (every mapped layer) + attention_kl (every mapped layer)

dskd runs ``training.module.train_step`` inside a DeepSpeed engine (1 process, CPU, ZeRO-0 fp32
by default). Two hand-written loops: ``plain``, what a user writes with transformers alone
(``model(**inputs).logits``: the masked-LM head on every token; eager attention with
``output_attentions``; the losses in a few lines), and ``plain_masked``, the careful one that
applies the heads to the masked tokens only (the economy dskd makes; its whole-vocabulary
logits of the masked tokens still exist at once). Timings rotate the three in rounds; the
results are ratios of medians. ``--memory``: each variant
(fused, naive) runs one step at ``--memory-seq`` in a fresh process and reports how far its
peak resident memory rose above the level before the step. Prints one JSON object.

    python bench/corpus.py [--rounds 7] [--steps 3] [--batch 16] [--seq 128] [--memory]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from common import add_shape_args, emit, optimizer_step, timed  # sets the single-process CPU environment

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dskd import models  # noqa: E402
from dskd.config import ArchConfig, StudentConfig, TrainingConfig  # noqa: E402
from dskd.data.corpus import BlockMasker, pack_corpus, read_corpus  # noqa: E402
from dskd.losses import LayerGeometry, build_loss_terms  # noqa: E402
from dskd.models.capture import QKCapture  # noqa: E402
from dskd.runtime.launch import free_port  # noqa: E402
from dskd.teacher.online import TeacherSide  # noqa: E402
from dskd.training import engine as eng  # noqa: E402
from dskd.training.module import DistillationModule, train_step  # noqa: E402
from dskd.training.stages import Stage, lr_factor  # noqa: E402

PAIRS = ((1, 2), (2, 4), (3, 6))
WEIGHTS = {"mlm_kd": 1.0, "hidden_cosine": 1.0, "attention_kl": 1.0}


def losses(kernel: str) -> dict:
    return {"mlm_kd": {"weight": 1.0, "temperature": 2.0, "hard_weight": 0.5, "kernel": kernel},
            "hidden_cosine": {"weight": 1.0, "layers": "all", "kernel": kernel},
            "attention_kl": {"weight": 1.0, "kernel": kernel}}


def make_models(args, eager: bool = False):
    """Teacher and student, the same weights every call; ``eager``: attention that returns its
    probabilities (the plain loop reads them; dskd recomputes them from captured Q and K)."""
    arch = ArchConfig(layers=args.teacher_layers, hidden=args.hidden, heads=args.heads, intermediate=4 * args.hidden,
                      dropout=0.0)
    teacher = models.build_from_arch(arch, 30522, 0, 0, seed=0, key="teacher.arch", model_class="AutoModelForMaskedLM")
    if eager:
        teacher.config._attn_implementation = "eager"
    student, _ = models.build_student(StudentConfig(teacher_layers=[t for _, t in PAIRS]), teacher, 0, 0, seed=0)
    return models.freeze(teacher, torch.float32, torch.device("cpu")), student


def make_batch(args):
    from transformers import BertTokenizerFast

    from dskd.config import resolve_path

    tokenizer = BertTokenizerFast(vocab=resolve_path("pkg://bert-base-uncased/vocab.txt"))
    blocks = pack_corpus(read_corpus([resolve_path("pkg://corpus-sample")]), tokenizer, args.seq)
    rows = blocks.select(range(args.batch)).with_format("torch")[:]
    batch = {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"], "idx": rows["idx"]}
    return BlockMasker(tokenizer, 0.15, seed=0)(batch, epoch=0)


def plain_loop(teacher, student, batch, training: TrainingConfig, total: int, masked_only: bool = False):
    """``masked_only``: the careful hand-written loop, which runs the encoders without their heads
    and applies each head to the masked tokens only (the economy dskd makes); otherwise the
    head runs on every token, as ``model(**inputs).logits`` does."""
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(eng.param_groups(student, training.weight_decay), lr=training.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(training.warmup_ratio * total), total)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels, mask = batch["labels"], batch["attention_mask"]
    masked = labels != -100
    student.train()

    def forward(model):
        if not masked_only:
            out = model(**inputs, output_hidden_states=True, output_attentions=True)
            return out, out.logits[masked]
        out = model.bert(**inputs, output_hidden_states=True, output_attentions=True)
        return out, model.cls(out.last_hidden_state[masked])

    def step():
        with torch.no_grad():
            t, zt = forward(teacher)
        s, zs = forward(student)
        kd = 4.0 * F.kl_div(F.log_softmax(zs / 2, -1), F.log_softmax(zt / 2, -1), reduction="batchmean",
                            log_target=True)
        loss = kd + 0.5 * F.cross_entropy(zs, labels[masked])
        real = mask.float()
        for k, (si, ti) in enumerate(PAIRS):
            cos = F.cosine_similarity(s.hidden_states[si], t.hidden_states[ti], dim=-1)
            loss = loss + ((1 - cos) * real).sum() / real.sum()
            a_s, a_t = s.attentions[k], t.attentions[ti - 1]  # [B, H, S, S], rows over real keys
            kl = (a_t * (a_t.clamp_min(1e-12).log() - a_s.clamp_min(1e-12).log())).sum(-1)  # [B, H, S]
            loss = loss + (kl.mean(1) * real).sum() / real.sum()
        loss.backward()
        optimizer_step(student, optimizer, scheduler, training.max_grad_norm)
        return loss

    return step


def dskd_loop(teacher, student, batch, training: TrainingConfig, total: int, ds_path: str, kernel: str = "fused"):
    ds, _ = eng.load_ds_config(ds_path, training)
    c_s, c_t = student.config, teacher.config
    geometry = LayerGeometry(PAIRS, c_s.hidden_size, c_t.hidden_size, c_s.num_attention_heads,
                             c_t.num_attention_heads, c_s.num_hidden_layers, c_t.num_hidden_layers)
    terms = build_loss_terms(losses(kernel), geometry)
    needs = frozenset().union(*(term.needs for term in terms.values()))
    module = DistillationModule(student, terms, needs, QKCapture(student, [s for s, _ in PAIRS], "student"))
    stages = [Stage("train", 0, total, WEIGHTS)]
    engine = eng.initialize(module, ds, training, lambda step: lr_factor(step, stages, training))
    engine.train()
    side = TeacherSide(teacher, QKCapture(teacher, [t for _, t in PAIRS], "teacher"))

    def step():
        return train_step(engine, side, batch, WEIGHTS, PAIRS)[0]

    return step


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_child(args) -> None:
    """One dskd step at ``--memory-seq`` with ``--kernel``, in this fresh process: MB of peak RSS
    above the level before the step (the second step: one-time allocations excluded)."""
    args.seq = args.memory_seq
    teacher, student = make_models(args)
    batch = make_batch(args)
    step = dskd_loop(teacher, student, batch, TrainingConfig(batch_size=args.batch, lr=1e-4), 10, args.deepspeed,
                     args.kernel)
    step()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    step()
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - base) / 1024}), flush=True)
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(parser, rounds=7, steps=3, warmup=2, hidden=256, heads=4)
    parser.set_defaults(batch=16)
    parser.add_argument("--deepspeed", default="ds_configs/zero0_fp32.json")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory, fused vs naive")
    parser.add_argument("--memory-seq", type=int, default=512)
    parser.add_argument("--memory-batch", type=int, default=8)
    parser.add_argument("--kernel", default="fused", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    eng.init_distributed()
    if args.child:
        memory_child(args)
        return

    torch.manual_seed(0)
    training = TrainingConfig(batch_size=args.batch, lr=1e-4)
    total = args.rounds * args.steps + args.warmup + 10
    batch = make_batch(args)
    sides = {"plain": plain_loop(*make_models(args, eager=True), batch, training, total),
             "plain_masked": plain_loop(*make_models(args, eager=True), batch, training, total, masked_only=True),
             "dskd": dskd_loop(*make_models(args), batch, training, total, args.deepspeed)}
    first = {name: step().item() for name, step in sides.items()}  # same start, same data: the same loss
    for _ in range(args.warmup - 1):
        for step in sides.values():
            step()
    times = {name: [] for name in sides}
    names = list(sides)
    for i in range(args.rounds):  # rotate the order so drift in machine load hits every side alike
        for name in names[i % 3:] + names[: i % 3]:
            times[name].append(timed(sides[name], args.steps))
    tokens = float(batch["attention_mask"].sum())
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "benchmark": "corpus_distillation",
        "ratio_dskd_over_plain": median["dskd"] / median["plain"],
        "ratio_dskd_over_plain_masked": median["dskd"] / median["plain_masked"],
        "tokens_per_s": {name: tokens / m for name, m in median.items()},
        "step_ms": {name: [round(1000 * t, 1) for t in ts] for name, ts in times.items()},
        "first_loss": first,
    }
    if args.memory:
        peaks = {}
        for kernel in ("fused", "naive"):
            cmd = [sys.executable, __file__, "--child", "--kernel", kernel, "--memory-seq", str(args.memory_seq),
                   "--batch", str(args.memory_batch), "--hidden", str(args.hidden), "--heads", str(args.heads),
                   "--teacher-layers", str(args.teacher_layers), "--deepspeed", args.deepspeed]
            env = dict(os.environ, MASTER_PORT=str(free_port()))  # this process holds the default port
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"memory run ({kernel}) failed:\n{proc.stderr[-3000:]}")
            out = proc.stdout
            peaks[kernel] = round(json.loads(out.strip().splitlines()[-1])["peak_mb"], 1)
        result["peak_step_mb_at_memory_seq"] = peaks
    emit(result, args)


if __name__ == "__main__":
    main()
