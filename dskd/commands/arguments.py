"""The ``dskd`` command line's arguments: every subcommand, its flags and help, the examples
``dskd --help`` prints, and a suggestion for a misspelled command. Nothing heavy is imported."""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path

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
    parser.set_defaults(command_names=list(sub.choices))
    return parser


# Other spellings of a command: suggested when one is given instead.
COMMAND_ALIASES = {"distil": "distill", "fine-tune": "finetune", "fine_tune": "finetune", "train": "finetune",
                   "eval": "evaluate", "cache": "cache-teacher", "probes": "train-probes"}


def check_command(parser: argparse.ArgumentParser, words: list[str]) -> None:
    """An unknown command gets a suggestion (argparse only lists the choices)."""
    names = parser.get_default("command_names")
    if not words or words[0].startswith("-") or words[0] in names:
        return
    close = COMMAND_ALIASES.get(words[0]) or next(iter(difflib.get_close_matches(words[0], names, n=1)), None)
    hint = f"; did you mean `dskd {close}`?" if close else "."
    parser.error(f"unknown command `{words[0]}`{hint} Commands: {', '.join(names)}")
