"""What does the teacher cache save? Epochs with the cache, with the online teacher and
with no teacher at all, side by side in one process.

The BERT-large (24L, H1024) -> 6L-H768 shape scaled down to CPU size: a 12-layer
teacher (hidden 256, 4 heads) and a 3-layer student of width 192 (``--student-hidden
256`` copies teacher layers 4, 8, 12 instead), on real GLUE training sentences (BERT
tokenizer, max_length 128). ``dskd cache-teacher``'s own code writes the
cache; then, for two loss sets, the same pre-collated batches are trained on by three
students with the same initial weights:

* ``online``: the frozen teacher runs on every batch (dskd's default);
* ``cached``: the teacher's outputs are read from the cache by example index;
* ``student_only``: hard labels only, no teacher outputs at all (the floor).

Loss sets: ``logits`` (0.5 CE + 0.5 soft-label KD) and ``internal`` (+ [CLS] cosine and
attention KL on the 3 mapped layers, which reads the teacher's Q/K for 3 layers).
Rounds alternate the order of the modes. Also reported: the cache's bytes per training
example against ``dskd plan``'s estimate, and the time to write the cache in units of
one online epoch. Prints one JSON object.

    python bench/teacher_cache.py [--examples 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import emit  # sets the single-process CPU environment

import torch  # noqa: E402

from dskd import data, models
from dskd.commands import cache_teacher as cache_command
from dskd.teacher import cache, cache_reader
from dskd.training import engine as eng
from dskd.teacher import online  # noqa: E402
from dskd.models.capture import QKCapture  # noqa: E402
from dskd.config import ExperimentConfig  # noqa: E402
from dskd.methods import load_experiment
from dskd.losses import LayerGeometry, build_loss_terms  # noqa: E402
from dskd.commands.plan import make_plan  # noqa: E402
from dskd.training.module import DistillationModule, train_step
from dskd.training.stages import Stage, lr_factor
from dskd.teacher.online import TeacherSide  # noqa: E402

LOGITS = {"hard_ce": {"weight": 0.5}, "soft_kd": {"weight": 0.5, "temperature": 2.0}}
INTERNAL = {**LOGITS, "cls_cosine": {"weight": 1.0}, "attention_kl": {"weight": 1.0}}
REPO = Path(__file__).resolve().parents[1]


def experiment(args, root: Path) -> ExperimentConfig:
    config = root / "bench.yaml"
    if args.student_hidden == args.hidden:
        student = f"{{init_from_teacher: true, layers: {args.student_layers}}}"
    else:
        student = (f"{{init_from_teacher: false, arch: {{layers: {args.student_layers}, hidden: {args.student_hidden}, "
                   f"heads: {args.heads}, intermediate: {4 * args.student_hidden}}}}}")
    config.write_text(f"""
seed: 0
data: {{task: {args.task}, path: {args.data}, max_length: {args.seq}, train_limit: {args.examples}, dev_limit: 64}}
teacher:
  arch: {{layers: {args.teacher_layers}, hidden: {args.hidden}, heads: {args.heads}, intermediate: {4 * args.hidden},
          dropout: 0.1}}
  tokenizer: pkg://bert-base-uncased
  random_ok: true  # a random teacher times the same as a trained one
student: {student}
losses:
  hard_ce: {{weight: 0.5}}
  soft_kd: {{weight: 0.5, temperature: 2.0}}
  cls_cosine: {{weight: 1.0}}
  attention_kl: {{weight: 1.0}}
training: {{batch_size: {args.batch}, lr: 1.0e-4, deepspeed: ds_configs/zero0_fp32.json}}
""")
    return load_experiment(config)


def make_engine(student, losses, pairs, t_cfg, training):
    geometry = LayerGeometry(pairs, student.config.hidden_size, t_cfg.hidden_size,
                             student.config.num_attention_heads, t_cfg.num_attention_heads)
    terms = build_loss_terms(losses, geometry)
    needs = frozenset({"logits"}).union(*(t.needs for t in terms.values()))
    capture = QKCapture(student, [s for s, _ in pairs], "student") if "attention_qk" in needs else None
    ds, _ = eng.load_ds_config("ds_configs/zero0_fp32.json", training)
    stages = [Stage("train", 0, 1_000_000, {})]
    engine = eng.initialize(DistillationModule(student, terms, needs, capture), ds, training,
                            lambda step: lr_factor(step, stages, training))
    engine.train()
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--teacher-layers", type=int, default=12)
    parser.add_argument("--student-layers", type=int, default=3)
    parser.add_argument("--student-hidden", type=int, default=192,
                        help="student width; equal to --hidden: copied from teacher layers")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="fp32", help="cache storage dtype")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "glue"))
    args = parser.parse_args()

    eng.init_distributed()
    root = Path(tempfile.mkdtemp(prefix="dskd-bench-cache-"))
    try:
        cfg = experiment(args, root)
        store_dir = root / "cache"
        start = time.perf_counter()
        cache_command.cache_teacher(cfg, store_dir, None, args.dtype, args.batch, False, ["bench"])
        write_s = time.perf_counter() - start
        plan = make_plan(cfg, dtype=args.dtype)
        store = cache_reader.TeacherCache(store_dir)

        task = data.get_task(args.task)
        tokenizer = models.load_tokenizer(cfg.teacher)
        train_set, _ = data.load_data(cfg, task, tokenizer)
        teacher = online.load_teacher(cfg, task, tokenizer)
        student0, init_layers = models.build_student(cfg.student, teacher, 2, tokenizer.pad_token_id, 0)
        n_student = student0.config.num_hidden_layers
        teacher = models.freeze(teacher, torch.float32, torch.device("cpu"))
        pairs = tuple(models.resolve_layer_map(None, init_layers, n_student, teacher.config.num_hidden_layers))
        side = TeacherSide(teacher, QKCapture(teacher, [t for _, t in pairs], "teacher"))
        batches = data.epoch_batches(len(train_set), 0, 0, 0, 1, args.batch, 1)
        collated = [data.collate([train_set[i] for i in b], tokenizer) for b in batches]
        training = cfg.training

        import copy

        epochs = {}
        for name, losses in (("logits", LOGITS), ("internal", INTERNAL)):
            weights = {k: float(v["weight"]) for k, v in losses.items()}
            layer_pairs = pairs if name == "internal" else ()
            for mode, teacher_side, mode_weights in (("online", side, weights), ("cached", store, weights),
                                                     ("student_only", None, {"hard_ce": 1.0})):
                engine = make_engine(copy.deepcopy(student0), losses, pairs, teacher.config, training)

                def epoch(engine=engine, teacher_side=teacher_side, mode_weights=mode_weights,
                          layer_pairs=layer_pairs if mode != "student_only" else ()):
                    for batch in collated:
                        train_step(engine, teacher_side, batch, mode_weights, layer_pairs)

                epochs[f"{name}/{mode}"] = epoch
        names = list(epochs)
        epochs[names[0]]()  # warm-up (allocator, lazy init)
        times = {n: [] for n in names}
        for i in range(args.rounds):
            for n in names if i % 2 == 0 else reversed(names):
                start = time.perf_counter()
                epochs[n]()
                times[n].append(time.perf_counter() - start)
        median = {n: statistics.median(t) for n, t in times.items()}

        read_times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            for batch in collated:
                store.outputs(batch, frozenset({"cls", "attention_qk"}), pairs, "train")
            read_times.append(time.perf_counter() - start)

        written = cache.cache_size(store_dir)
        train_written = cache.cache_size(store_dir / "train")
        examples = {split: sum(s["examples"] for s in shards) for split, shards in store.manifest["shards"].items()}
        estimate = plan["cache"]["total_bytes"]
        result = {
            "benchmark": "teacher_cache",
            "ratio_cached_over_online": {k: median[f"{k}/cached"] / median[f"{k}/online"] for k in ("logits", "internal")},
            "ratio_cached_over_student_only": {k: median[f"{k}/cached"] / median[f"{k}/student_only"]
                                               for k in ("logits", "internal")},
            "read_share_of_cached_internal_epoch": statistics.median(read_times) / median["internal/cached"],
            "write_over_online_internal_epoch": write_s / median["internal/online"],
            "epoch_s_median": {n: round(t, 3) for n, t in median.items()},
            "cache": {
                "dtype": cache.storage_dtype(args.dtype),
                "bytes_on_disk": written,
                "plan_estimate_bytes": estimate,
                "on_disk_over_estimate": written / estimate,
                "bytes_per_train_example": train_written / examples["train"],
                "plan_bytes_per_train_example": plan["cache"]["bytes_per_train_example"],
                "per_example_on_disk_over_plan": train_written / examples["train"]
                / plan["cache"]["bytes_per_train_example"],
                "examples": examples,
                "mean_train_length": plan["cache"]["splits"]["train"]["mean_length"],
                "attention_qk_bytes_train": plan["cache"]["splits"]["train"]["bytes"]["attention_qk"],
                "attention_as_maps_bytes_train": plan["cache"]["splits"]["train"]["attention_as_maps_bytes"],
            },
            "summary": plan["summary"],
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    emit(result, args)


if __name__ == "__main__":
    main()
