"""``dskd`` command line: finetune, distill, cache-teacher, augment, train-probes, plan, report, evaluate, export."""

from __future__ import annotations

import errno
import json
import os
import sys
import warnings

from dskd.commands.arguments import build_parser, check_command
from dskd.errors import DskdError, RankError

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

    cfg = load_experiment(args.config, args.overrides, check_paths=CONFIG_PATHS["evaluate"])
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


# Commands whose models come from flags (--model, --models): their config gives the task and the
# data, so its model paths (a recipe's teacher.path, say) need not exist.
CONFIG_PATHS = {"evaluate": "data", "robustness": "data"}


def _check_config_early(args) -> None:
    """Validate the experiment's schema and --set overrides before anything imports torch,
    transformers or datasets (seconds): a typo is answered at once. dskd.config is torch-free;
    the loss terms' and methods' checks need their registries and follow in load_experiment."""
    if getattr(args, "config", None) is not None:
        from dskd.config import check_trained_teacher, load_config

        cfg = load_config(args.config, args.overrides, check_paths=CONFIG_PATHS.get(args.command, True))
        learns = args.command in ("distill", "train-probes") or (args.command == "cache-teacher" and not args.dry_run)
        if learns:  # checked again where the teacher is built, for callers that skip the CLI
            check_trained_teacher(cfg, args.command)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    check_command(parser, sys.argv[1:] if argv is None else [str(a) for a in argv])
    args = parser.parse_args(argv)
    # What run.json records as the command: the arguments given, also when called in-process.
    args.argv = list(sys.argv) if argv is None else ["dskd", *map(str, argv)]
    try:
        _check_path_flags(args)
        _check_config_early(args)
        # Before torch is imported: OpenMP reads its thread settings once, when torch loads it.
        from dskd.runtime.launch import configure_threads

        configure_threads()
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

            cfg = load_experiment(args.config, args.overrides, check_paths=CONFIG_PATHS["robustness"])
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
        # Every rank hits the same input error; one copy of the message is enough. A RankError
        # is this rank's alone: it always speaks, and exits 1 so that the others are stopped.
        alone = isinstance(exc, RankError)
        if alone or os.environ.get("RANK", "0") == "0":
            print(f"dskd: error: {exc}", file=sys.stderr)
        return 1 if alone else 2
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
