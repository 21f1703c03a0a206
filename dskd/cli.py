"""``dskd`` command line: finetune, distill, cache-teacher, augment, train-probes, plan, report, evaluate, export."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import warnings
from pathlib import Path

from dskd.errors import DskdError

# Raw: the examples keep their `\` line continuations, so each is a command a user can paste.
EXAMPLES = r"""examples:
  dskd finetune --config configs/quickstart.yaml --output runs/teacher
  dskd distill  --config configs/quickstart.yaml --output runs/student --set teacher.path=runs/teacher
  dskd distill  --config configs/tiny.yaml --output runs/tiny --deepspeed ds_configs/zero2_bf16.json
  dskd plan     --config configs/quickstart.yaml --set teacher.path=runs/teacher
  dskd cache-teacher --config configs/quickstart.yaml --set teacher.path=runs/teacher --output runs/cache
  dskd distill  --config configs/quickstart.yaml --output runs/cached --set teacher.path=runs/teacher \
                --set teacher.cache=runs/cache
  dskd train-probes --config configs/results/universal_kd.yaml --output runs/probes \
                --set teacher.path=runs/teacher
  dskd augment  --config configs/results/glitter.yaml --output runs/pool --candidates 8
  dskd evaluate --model runs/student/model --config configs/quickstart.yaml
  dskd export   --run runs/student --out exported/student
  dskd robustness --models runs/teacher runs/student --config configs/quickstart.yaml \
                --set data.path=../shared/data/glue --output runs/robustness
  launchers/local.sh 2 distill --config configs/tiny.yaml --output runs/tiny2
"""


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set training.lr=3e-5 --set data.path=/data/glue (repeatable)",
    )


# Subcommands that read an experiment and write one folder: (short help, description).
COMMANDS = {
    "finetune": (
        "train a teacher on the task (hard labels), using the config's teacher and finetune sections",
        "Fine-tune the config's teacher on data.task with hard labels. The run's model/ folder "
        "can then be used as teacher.path for `dskd distill`.",
    ),
    "distill": (
        "distil the frozen teacher into the student with the configured losses and schedule",
        "Distil teacher -> student. The teacher is frozen and stays outside the DeepSpeed engine; "
        "the student and any trainable loss modules are wrapped with the ZeRO stage and dtype of --deepspeed.",
    ),
    "cache-teacher": (
        "run the teacher once over train and dev and store what the configured losses need",
        "Write the teacher cache that `dskd distill` reads with `teacher.cache: CACHE`: logits, and for "
        "the mapped teacher layers the [CLS] vectors and attention Q/K the configured losses use, memory-mapped. "
        "Every rank writes its own shard; an interrupted run resumes when the same command is run again.",
    ),
    "augment": (
        "Glitter: write a pool of augmented candidates of every training example (data.augment)",
        "Generate --candidates augmented copies of every training example of the config's data and "
        "save them as a `datasets` split (DIR/candidates) with DIR/manifest.json. Candidate j of example idx has "
        "the id idx * candidates + j. Masked-LM fill-in with the teacher's own MLM head where teacher.path has one, "
        "else EDA operations (random deletion, swap, insertion of a word of the same sentence). Deterministic in "
        "--seed; one process. Point `data.augment` at DIR, then run `dskd cache-teacher` (it adds the candidates' "
        "teacher logits) and `dskd distill` with the `glitter` loss term.",
    ),
    "train-probes": (
        "Universal-KD: fit the frozen teacher's per-layer pseudo-classifiers and save them",
        "Run the frozen teacher once over the training set, fit one linear classifier per layer on its "
        "[CLS] vectors and the gold labels, print each one's dev accuracy and save them to --output; set "
        "`losses.universal_kd.teacher_probes: DIR` to distil with them. One process (not under a launcher).",
    ),
}


def _command(sub, name: str, output: str) -> argparse.ArgumentParser:
    """A subcommand of ``COMMANDS``: it reads an experiment config and writes one folder (``--output``)."""
    help, description = COMMANDS[name]
    p = sub.add_parser(name, help=help, description=description)
    _add_config(p)
    p.add_argument("--output", required=True, type=Path, help=output)
    return p


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                   help="where the models run (default auto: this rank's GPU when there is one, else the CPU)")


def _add_training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--deepspeed", help="DeepSpeed JSON from ds_configs/ (ZeRO stage and dtype); overrides training.deepspeed")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its latest complete checkpoint")
    p.add_argument("--auto-resume", action="store_true",
                   help="resume if --output holds a checkpoint of this config, else start (what requeued jobs run)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dskd",
        description="Knowledge distillation for Transformer language models on DeepSpeed.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run_folder = "run folder (checkpoints/, tensorboard/, metrics.json, model/)"
    _add_training(_command(sub, "finetune", run_folder))
    _add_training(_command(sub, "distill", run_folder))

    p = _command(sub, "cache-teacher", "cache folder to write")
    p.add_argument("--deepspeed", help="DeepSpeed JSON whose dtype the teacher runs in (default: training.deepspeed)")
    p.add_argument("--dtype", help="storage dtype: fp32, fp16 or bf16 (default: the run's dtype); logits stay fp32")
    p.add_argument("--batch-size", type=int, help="teacher batch size (default: 2 x training.batch_size)")
    p.add_argument("--overwrite", action="store_true", help="replace whatever --output holds")
    p.add_argument("--dry-run", action="store_true", help="print the plan (as `dskd plan`) and write nothing")

    p = _command(sub, "augment", "pool folder to write")
    p.add_argument("--candidates", type=int, default=8, help="candidates per training example (default 8)")
    p.add_argument("--seed", type=int, default=0, help="generation seed (default 0; not the run's seed)")
    p.add_argument("--method", default="auto", choices=["auto", "eda", "mlm"],
                   help="auto (default): the teacher's masked-LM head if it has one, else EDA; mlm: refuse "
                   "without one; eda: EDA operations")
    p.add_argument("--ops", nargs="+", default=["delete", "swap", "insert"],
                   help="EDA operations, used in turn by candidate number (default: delete swap insert)")
    p.add_argument("--alpha", type=float, default=0.1,
                   help="EDA: share of words changed (deletion probability; swaps/insertions per word; default 0.1)")
    p.add_argument("--mask-rate", type=float, default=0.15, help="MLM: share of word pieces masked (default 0.15)")
    p.add_argument("--top-k", type=int, default=10, help="MLM: draw each fill-in from the top k (default 10)")
    p.add_argument("--overwrite", action="store_true", help="replace the pool --output holds")

    p = _command(sub, "train-probes", "folder to write (probes.safetensors, manifest.json)")
    p.add_argument("--layers", type=int, nargs="+",
                   help="teacher layers (1-based; default: the config's universal_kd teacher_layers, else all)")
    p.add_argument("--epochs", type=int, default=20, help="passes of Adam over the cached vectors (default 20)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate on standardised vectors (default 1e-2)")
    p.add_argument("--fit-batch-size", type=int, default=64, help="mini-batch of the fit (default 64)")
    p.add_argument("--batch-size", type=int, help="teacher batch size (default: 2 x training.batch_size)")
    p.add_argument("--overwrite", action="store_true", help="replace the probes --output holds")

    p = sub.add_parser(
        "plan",
        help="print the teacher cache's size and the per-rank model memory, without running anything",
    )
    _add_config(p)
    p.add_argument("--deepspeed", help="DeepSpeed JSON (ZeRO stage and dtype; default: training.deepspeed)")
    p.add_argument("--dtype", help="cache storage dtype: fp32, fp16 or bf16 (default: the run's dtype)")
    p.add_argument("--world-size", type=int, help="ranks to plan ZeRO partitioning for (default: 1)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    p = sub.add_parser("schema", help="print the experiment config's JSON Schema (for editors: completion and checks)")
    p.add_argument("--output", type=Path, help="write it to this file instead (configs/schema.json is this output)")

    p = sub.add_parser("report", help="one table of the hyper-parameters and final metrics of many runs (a sweep)")
    p.add_argument("roots", nargs="+", type=Path, help="run folders, or folders holding them (searched recursively)")
    p.add_argument("--json", action="store_true", help="print the collected runs as JSON")

    p = sub.add_parser("evaluate", help="print a model's dev metrics on data.task as JSON")
    p.add_argument("--model", required=True, help="a Hugging Face model folder, or a dskd run folder (uses its model/)")
    _add_config(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--predictions", type=Path, metavar="FILE",
                   help="also write every dev example's prediction to FILE (JSON lines, as a run's dev_predictions.jsonl)")
    _add_device(p)

    p = sub.add_parser("robustness", help="score models on dev, out-of-domain and adversarial sets: one table",
                       description="Score each model (run or model folder, the teacher too) with its own tokenizer on "
                                   "the task's dev set, the out-of-domain and adversarial sets shipped for the task "
                                   "(SST-2: imdb, advglue; RTE: advglue) and any --eval-file; write robustness.md "
                                   "and robustness.json (docs/robustness.md).")
    p.add_argument("--models", nargs="+", required=True, help="run folders (their model/) or model folders")
    _add_config(p)
    p.add_argument("--output", required=True, type=Path, help="folder for robustness.md and robustness.json")
    p.add_argument("--sets", nargs="+", help="only these sets (default: all of the task's)")
    p.add_argument("--data-root", default="../shared/data/robustness", help="folder of the shipped sets")
    p.add_argument("--eval-file", action="append", default=[], metavar="NAME=PATH",
                   help="another GLUE-format TSV with the task's columns (repeatable)")
    p.add_argument("--label-map", action="append", default=[], metavar="NAME:FILE_LABEL=TASK_LABEL,...",
                   help="map a set's labels onto the task's, e.g. reviews:pos=positive,neg=negative")
    p.add_argument("--max-examples", type=int, help="at most this many examples per set, drawn with --seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, help="tokens per example (default: data.max_length; longer texts "
                                                  "keep their first tokens)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--attacks", nargs="+", choices=["word", "char"], default=[],
                   help="attack each model on a sample of dev: word substitution, character edits")
    p.add_argument("--attack-examples", type=int, default=100, help="dev examples attacked per model (seeded)")
    p.add_argument("--max-queries", type=int, default=500, help="model calls per attacked example")
    p.add_argument("--max-words", type=float, default=0.2, help="share of an example's words an attack may change")
    p.add_argument("--mlm", help="a masked LM whose proposals are the word attack's substitutes (default: the "
                                 "nearest words in each model's own embedding table)")
    p.add_argument("--compare-to", metavar="MODEL", help="one of --models (path or folder name): every other model's "
                   "difference from it per set and attack, with a paired bootstrap's interval and p")
    _add_device(p)

    p = sub.add_parser("export", help="write a run's trained model as a Hugging Face folder with a model card (README.md)")
    p.add_argument("--run", required=True, type=Path, help="the --output folder of a finetune or distill run")
    p.add_argument("--out", required=True, type=Path,
                   help="folder to write (transformers.pipeline and AutoModelForSequenceClassification load it)")
    p.add_argument("--tag", help="checkpoint tag, e.g. step00000500 (default: the newest complete one); the card of a "
                                 "checkpoint before the run's end says it is not the final model")
    p.add_argument("--overwrite", action="store_true", help="replace the exported model --out holds")
    return parser


# Warnings our normal runs print that a user can do nothing about: (category, message, module),
# regular expressions as in warnings.filterwarnings. Found by running the quick start, tiny runs
# (1 and 2 ranks, ZeRO 0-3) and the tests with these filters off; every other warning shows.
KNOWN_NOISE = (
    # DeepSpeed's ZeRO-2/3 call collectives torch 2.13 deprecates: one line per call, on every rank.
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
     r"torch\.distributed"),
)


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for category, message, module in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    import datasets

    datasets.disable_progress_bars()


def _check_path_flags(args) -> None:
    """The model flags, checked before anything heavy is imported: a mistyped path fails at once
    instead of becoming a hub request (``dskd.config.paths``)."""
    from dskd.config.paths import check_source

    if args.command == "evaluate":
        check_source(args.model, "--model")
    elif args.command == "robustness" and args.mlm is not None:
        # --models are checked as each one's turn comes (also fast): those before keep their results
        from dskd.commands.robustness import MLM

        check_source(args.mlm, "--mlm", MLM)
    elif args.command == "export" and not args.run.is_dir():
        raise DskdError(f"--run points to {args.run}, which does not exist; give the --output folder of a "
                        "finetune or distill run")


def _glue_only(cfg, config: str, command: str, why: str) -> None:
    """Commands of GLUE jobs refuse a corpus config (data.corpus) with what they do instead."""
    if cfg.data.corpus is not None:
        raise DskdError(f"--config {config} is a corpus job (data.corpus); `dskd {command}` {why}")


def _evaluate(args) -> dict:
    from dskd import data, models
    from dskd.config import TeacherConfig
    from dskd.methods import load_experiment
    from dskd.runtime import dist
    from dskd.training.evaluation import predict, write_predictions

    cfg = load_experiment(args.config, args.overrides)
    _glue_only(cfg, args.config, "evaluate", "scores a model on a GLUE task's dev set. A corpus run's held-out "
               "metrics are in its metrics.json; to score a general student on a task, fine-tune or distil it first "
               "(student.init)")
    device = dist.resolve_device(args.device)
    task = data.get_task(cfg.data.task)
    source = TeacherConfig(path=args.model)
    tokenizer = models.load_tokenizer(source, key="--model")
    model = models.load_pretrained(args.model, task.num_labels, for_finetune=False, key="--model").eval().to(device)
    raw = data.load_split(task, cfg.data.path, "dev", cfg.data.dev_limit)
    dev = data.tokenize_split(raw, tokenizer, cfg.data.max_length)
    predictions, labels = predict(
        lambda b: getattr(model(**models.model_inputs(b, model)), task.prediction), dev, task, tokenizer, args.batch_size,
        device,
    )
    result = task.score(predictions, labels)
    if args.predictions is not None:
        write_predictions(args.predictions, task, predictions, labels)
    return {"task": task.name, **result}


def _train(args, role: str) -> int:
    from dskd.training.preemption import EXIT_PREEMPTED, StopRequest

    stop = StopRequest()  # first of all: from here on SIGTERM/SIGUSR1 stop the run cleanly, even during start-up
    from dskd.methods import load_experiment
    from dskd.training import engine, run_dir, run_lock
    from dskd.training.job import prepare
    from dskd.training.loop import run
    from dskd.training.monitor import quiet_bars_in_batch_logs

    try:
        cfg = load_experiment(args.config, args.overrides)
        quiet_bars_in_batch_logs(cfg.finetune if role == "finetune" else cfg.training)
        job = prepare(cfg, role, args.output, args.deepspeed, args.resume, args.overwrite, args.auto_resume)
        result = run(job, args.argv, stop)
    except DskdError as exc:
        run_dir.fail(str(exc))
        raise
    except OSError as exc:
        error = DskdError(_io_error(exc, args.output)) if exc.errno in IO_ERRNOS else None
        run_dir.fail(str(error or f"{type(exc).__name__}: {exc}"))
        if error is None:
            raise
        raise error from None
    except BaseException as exc:
        run_dir.fail(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        run_dir.forget()
        run_lock.release()
        stop.restore()
    if result.get("preempted"):
        return EXIT_PREEMPTED
    if engine.rank() == 0 and not result.get("halted"):
        out = args.output
        if "teacher" in result:
            print(f"teacher dev: {json.dumps(result['teacher'])}")
        final = {k: v for k, v in result.items() if k not in ("teacher", "best", "step")}
        print(f"{'student' if role == 'distill' else 'model'} dev: {json.dumps(final)}")
        print(f"run folder: {out}  (metrics.json, model/, checkpoints/)")
        print(f"tensorboard: tensorboard --logdir {out / 'tensorboard'}")
    return 0


IO_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.ENOTDIR, errno.EACCES, errno.EDQUOT, errno.EIO, errno.EPERM}


def _io_error(exc: OSError, out) -> str:
    """One line for a file system refusing a write: the file, the cause, what to do."""
    where = exc.filename or out
    fix = {errno.ENOSPC: "free space there or choose another --output (`dskd plan` estimates a checkpoint's size)",
           errno.EDQUOT: "your disk quota is used up; free space or choose another --output",
           errno.EROFS: "the file system is read-only; choose another --output"}.get(
        exc.errno, "check the path and its permissions, or choose another --output")
    return f"cannot write {where}: {exc.strerror} ({errno.errorcode.get(exc.errno, exc.errno)}); {fix}"


def _plan(args) -> int:
    from dskd.commands.plan import format_plan, make_plan
    from dskd.methods import load_experiment

    cfg = load_experiment(args.config, args.overrides)
    world = getattr(args, "world_size", None)
    if world is not None and world < 1:
        raise DskdError(f"--world-size must be at least 1, got {world}")
    plan = make_plan(cfg, args.deepspeed, args.dtype, world)
    print(json.dumps(plan, indent=2) if getattr(args, "json", False) else format_plan(plan))
    return 0


def _cache_teacher(args) -> int:
    from dskd.commands.cache_teacher import cache_teacher
    from dskd.methods import load_experiment
    from dskd.teacher import cache
    from dskd.training import engine

    cfg = load_experiment(args.config, args.overrides)
    _glue_only(cfg, args.config, "cache-teacher", "stores a teacher's outputs on a GLUE task; a corpus job runs its "
               "teacher online (docs/general.md, 'Teacher cache')")
    manifest = cache_teacher(cfg, args.output, args.deepspeed, args.dtype, args.batch_size, args.overwrite,
                                   args.argv)
    if engine.rank() == 0:
        examples = {split: sum(s["examples"] for s in shards) for split, shards in manifest["shards"].items()}
        size = cache.cache_size(args.output)
        print(f"teacher cache: {args.output} ({cache.human(size)}; "
              + ", ".join(f"{split} {n} examples" for split, n in examples.items())
              + f"; stores {', '.join(manifest['layout']['fields'])}"
              + (f" for teacher layers {manifest['layout']['layers']}" if manifest["layout"]["layers"] else "") + ")")
        print(f"use it with: dskd distill ... --set teacher.cache={args.output}")
    return 0


def _augment(args) -> int:
    from dskd.methods import load_experiment
    from dskd.methods.glitter_pool import augment

    cfg = load_experiment(args.config, args.overrides)
    _glue_only(cfg, args.config, "augment", "writes Glitter's candidates of a GLUE task's training examples")
    manifest = augment(cfg, args.output, args.candidates, args.seed, args.method, args.alpha, args.ops,
                       args.mask_rate, args.top_k, args.overwrite, args.argv)
    print(f"candidate pool: {args.output} ({manifest['source']['examples']} examples x {manifest['candidates']} "
          f"candidates, {manifest['method']}, seed {manifest['seed']}, fingerprint {manifest['fingerprint']})")
    print(f"use it with: dskd cache-teacher ... --set data.augment={args.output}, then dskd distill ... "
          f"--set data.augment={args.output}")
    return 0


def _train_probes(args) -> int:
    from dskd.methods import load_experiment
    from dskd.methods.universal_probes import train_probes

    cfg = load_experiment(args.config, args.overrides)
    _glue_only(cfg, args.config, "train-probes", "fits Universal-KD's pseudo-classifiers on a GLUE task's labels")
    manifest = train_probes(cfg, args.output, args.batch_size, args.epochs, args.lr, args.fit_batch_size,
                            args.layers, args.overwrite, args.argv)
    for layer, accuracy in manifest["dev_accuracy"].items():
        print(f"probe {layer}: dev accuracy {accuracy:.4f}  (train {manifest['train_accuracy'][layer]:.4f})")
    print(f"teacher probes dev: {json.dumps(manifest['dev_accuracy'])}")
    print(f"teacher probes: {args.output}; use them with: dskd distill ... "
          f"--set losses.universal_kd.teacher_probes={args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # What run.json records as the command: the arguments given, also when called in-process.
    args.argv = list(sys.argv) if argv is None else ["dskd", *map(str, argv)]
    try:
        _check_path_flags(args)
        _quiet_libraries()
        if args.command in ("finetune", "distill"):
            code = _train(args, args.command)
        elif args.command == "plan" or (args.command == "cache-teacher" and args.dry_run):
            code = _plan(args)
        elif args.command == "cache-teacher":
            code = _cache_teacher(args)
        elif args.command == "train-probes":
            code = _train_probes(args)
        elif args.command == "augment":
            code = _augment(args)
        elif args.command == "schema":
            from dskd.commands.schema import schema_text

            if args.output is None:
                sys.stdout.write(schema_text())
            else:
                args.output.write_text(schema_text())
            code = 0
        elif args.command == "report":
            from dskd.training.report import collect, format_table

            report = collect(args.roots)
            print(json.dumps(report, indent=2) if args.json else format_table(report))
            code = 0
        elif args.command == "evaluate":
            print(json.dumps(_evaluate(args)))
            code = 0
        elif args.command == "robustness":
            from dskd.commands.robustness import format_table as robustness_table
            from dskd.commands.robustness import parse_named, run_robustness
            from dskd.methods import load_experiment

            from dskd.runtime import dist, launch

            cfg = load_experiment(args.config, args.overrides)
            _glue_only(cfg, args.config, "robustness", "scores classifiers on a task's sets")
            if launch.detect().world > 1:  # launched on several ranks: they share the sets and the attacks
                dist.init_distributed()
            table = run_robustness(cfg, args.models, args.data_root, args.output, args.sets,
                                   parse_named(args.eval_file, "--eval-file"), parse_named(args.label_map, "--label-map"),
                                   args.max_examples, args.seed, args.max_length, args.batch_size, args.attacks,
                                   args.attack_examples, args.max_queries, args.max_words, args.mlm,
                                   args.compare_to, dist.resolve_device(args.device))
            if dist.rank() == 0:
                print(robustness_table(table), end="")
            code = 0
        else:
            from dskd.training.export import export_run

            print(export_run(args.run, args.out, args.tag, overwrite=args.overwrite))
            code = 0
    except DskdError as exc:
        # Every rank hits the same input error; one copy of the message is enough.
        if os.environ.get("RANK", "0") == "0":
            print(f"dskd: error: {exc}", file=sys.stderr)
        return 2
    return code


def run_and_exit() -> None:
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    exit_file = os.environ.get("DSKD_EXIT_FILE")
    if exit_file and code in (0, 2, 85):
        # Under launchers/*.sh: rank 0 reports the code in a file and every rank exits 0, so
        # torchrun/mpirun print no failure report for a clean stop (an input error, preemption);
        # the launcher script exits with the reported code. Crashes keep their code, so the
        # launcher still stops the other ranks.
        if os.environ.get("RANK", "0") == "0":
            with open(exit_file, "w") as fh:
                fh.write(f"{code}\n")
        code = 0
    # ZeRO-3 runs can abort at interpreter exit in a gloo worker thread after all work
    # is done (notes: 12 of 45 runs); skipping interpreter teardown avoids it.
    os._exit(code)


if __name__ == "__main__":
    run_and_exit()
