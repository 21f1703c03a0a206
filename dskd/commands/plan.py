"""``dskd plan``: what a run will cost before anything heavy runs.

Reads the configs of teacher and student (no weights), tokenises the data (the token
counts decide the cache's size; ``datasets`` keeps the result for the real run) and
reports the teacher cache's size per field and the memory the models take per rank.

Model memory per rank, from parameter counts P (the whole per-rank peak RSS, with the runtime,
DeepSpeed's buffers, activations and the export, is ``dskd.commands.memory``'s estimate):

* teacher (online mode only): P_t x the run's dtype size; a cached run holds none.
* CoDIR's memory banks: 2 x N_train x dim x the bank dtype, whole on every rank.
* student under DeepSpeed: weights, gradients and Adam state. fp32 training keeps
  4 + 4 + 8 bytes per parameter; bf16/fp16 keep 2 + 2 bytes of low-precision weights and
  gradients plus 4 + 8 of fp32 master weights and Adam moments. ZeRO-1 divides the
  optimizer state (master + moments) by the world size, ZeRO-2 the gradients too, ZeRO-3
  the weights too.
"""

from __future__ import annotations

import torch

from dskd.commands.memory import TOKEN_BYTES, estimate_rss, format_rss
from dskd.teacher import cache
from dskd.config import ExperimentConfig
from dskd.errors import DskdError


def _param_count(config, model_class: str = "AutoModelForSequenceClassification") -> int:
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, model_class).from_config(config)
    return sum(p.numel() for p in model.parameters())


def student_bytes(params: int, dtype: torch.dtype, zero_stage: int, world: int) -> dict[str, int]:
    low = dtype in (torch.bfloat16, torch.float16)
    weights, grads, optimizer = (2 if low else 4) * params, (2 if low else 4) * params, (12 if low else 8) * params
    if zero_stage >= 1:
        optimizer //= world
    if zero_stage >= 2:
        grads //= world
    if zero_stage >= 3:
        weights //= world
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "total": weights + grads + optimizer}


def memory_bank_bytes(losses: dict, n_train: int) -> int:
    """CoDIR's two [N_train, dim] banks (student and teacher side), on every rank."""
    from dskd.methods.codir import BANK_DTYPES
    from dskd.losses import term_type

    total = 0
    for name, spec in losses.items():
        if term_type(name, spec) == "codir":
            size = torch.tensor([], dtype=BANK_DTYPES[spec.get("bank_dtype", "float32")]).element_size()
            total += 2 * n_train * int(spec.get("dim", 128)) * size
    return total


def teacher_name(config, path: str | None) -> str:
    if path:
        parts = str(path).rstrip("/").split("/")
        return parts[-2] if parts[-1] == "model" and len(parts) > 1 else parts[-1]  # a dskd run's model/
    return f"{config.model_type}-{config.num_hidden_layers}L-H{config.hidden_size} (teacher.arch)"


def make_plan(cfg: ExperimentConfig, deepspeed_path: str | None = None, dtype: str | None = None,
              world: int | None = None) -> dict:
    """The cache size (per split and field) and per-rank model memory of ``cfg``'s distillation."""
    from dskd import data, models
    from dskd.losses import mapped_pairs, spec_for
    from dskd.training import engine as eng

    world = world or eng.world_size()
    training = eng.at_world_size(cfg.training, world)
    ds_config, _ = eng.load_ds_config(deepspeed_path or training.deepspeed, training)
    run_dtype = eng.run_dtype(ds_config)
    zero = eng.zero_stage(ds_config)
    store_dtype = cache.storage_dtype(dtype or str(run_dtype).replace("torch.", ""))
    if cfg.data.corpus is not None:
        return make_corpus_plan(cfg, run_dtype, zero, world, store_dtype, ds_config)
    task = data.get_task(cfg.data.task)
    if cfg.teacher.path is None and cfg.teacher.arch is None:
        raise DskdError("`dskd plan` needs `teacher.path` or `teacher.arch` to know the teacher's shape")
    tokenizer = models.load_tokenizer(cfg.teacher)
    if cfg.teacher.path is not None:
        t_config = models.pretrained_config(cfg.teacher.path, task.num_labels)
    else:
        t_config = models.arch_config(cfg.teacher.arch, len(tokenizer), task.num_labels, tokenizer.pad_token_id,
                                      "teacher.arch")
    init_layers, n_student = models.student_layer_plan(cfg.student, t_config.num_hidden_layers)
    if cfg.student.init_from_teacher:
        s_config = type(t_config).from_dict({**t_config.to_dict(), "num_hidden_layers": n_student})
    else:
        s_config = models.arch_config(cfg.student.arch, t_config.vocab_size, task.num_labels,
                                      tokenizer.pad_token_id, "student.arch")
    if cfg.student.kronecker is not None:  # KroneckerBERT: count the factored student
        from dskd.models.kronecker import kronecker_config

        s_config = kronecker_config(s_config, cfg.student.kronecker)
    pairs = mapped_pairs(cfg, cfg.losses, init_layers, n_student, t_config.num_hidden_layers)
    try:
        spec_for(cfg.losses, pairs)
        refused = None
    except DskdError as exc:  # a term the cache cannot serve: the memory estimate still holds online
        refused = str(exc)
    spec = spec_for(cfg.losses, pairs, strict=False)
    train_set, dev_set = data.load_data(cfg, task, tokenizer)
    hidden, heads, labels = t_config.hidden_size, t_config.num_attention_heads, task.num_labels
    splits, longest = {}, {}
    for split, dataset in (("train", train_set), ("dev", dev_set)):
        lengths = cache.token_lengths(dataset)
        longest[split] = int(lengths.max()) if len(lengths) else cfg.data.max_length
        fields = cache.estimate_bytes(spec, len(lengths), int(lengths.sum()), hidden, labels, store_dtype)
        splits[split] = {
            "examples": len(lengths),
            "tokens": int(lengths.sum()),
            "mean_length": float(lengths.mean()) if len(lengths) else 0.0,
            "bytes": fields,
            "total_bytes": sum(fields.values()),
            "attention_as_maps_bytes": cache.attention_map_bytes(lengths, len(spec.layers), heads, store_dtype)
            if "attention_qk" in spec.fields else 0,
        }
    total = sum(s["total_bytes"] for s in splits.values())
    bank = memory_bank_bytes(cfg.losses, splits["train"]["examples"])
    teacher_params, student_params = _param_count(t_config), _param_count(s_config)
    dsize = torch.tensor([], dtype=run_dtype).element_size()
    name = teacher_name(t_config, cfg.teacher.path)
    summary = (f"{name}, {task.name}, {len(spec.layers)} mapped layers, S={cfg.data.max_length}, "
               f"{store_dtype}: {cache.human(total)}")
    return {
        "summary": summary,
        "task": task.name,
        "cache": {"dtype": store_dtype, "fields": list(spec.fields), "teacher_layers": list(spec.layers),
                  "refused": refused,
                  "splits": splits, "total_bytes": total,
                  "bytes_per_train_example": splits["train"]["total_bytes"] / max(splits["train"]["examples"], 1)},
        "memory_per_rank": {
            "run_dtype": str(run_dtype).replace("torch.", ""), "zero_stage": zero, "world_size": world,
            "teacher_params": teacher_params, "teacher_bytes_online": teacher_params * dsize,
            "teacher_bytes_cached": 0,
            "student_params": student_params,
            "student_bytes": student_bytes(student_params, run_dtype, zero, world),
            "memory_bank_bytes": bank,
            "rss": estimate_rss(teacher_config=t_config, student_config=s_config, teacher_params=teacher_params,
                                student_params=student_params, dtype=run_dtype, zero=zero, world=world,
                                ds_config=ds_config, batch=training.batch_size, train_length=longest["train"],
                                eval_length=longest["dev"], teacher_online=cfg.teacher.cache is None,
                                data_bytes=sum(TOKEN_BYTES * s["tokens"] for s in splits.values()),
                                extra_bytes=bank, mapped_layers=len(pairs)),
        },
        "disk": disk_plan(student_params, run_dtype, zero, training.keep_checkpoints),
    }


def disk_plan(params: int, run_dtype: torch.dtype, zero: int, keep: int) -> dict:
    """What the run folder takes: the figures the run's own free-space check uses."""
    from dskd.training.checkpoint import checkpoint_bytes

    one = checkpoint_bytes(params, run_dtype, zero)
    return {"checkpoint_bytes": one, "keep_checkpoints": keep, "export_bytes": params * 4,
            "peak_bytes": one * (keep + 1) + params * 4}


def format_disk(d: dict) -> list[str]:
    return ["", f"disk (run folder): a checkpoint {cache.human(d['checkpoint_bytes'])}, the exported model "
                f"{cache.human(d['export_bytes'])}; at most {cache.human(d['peak_bytes'])} with keep_checkpoints "
                f"{d['keep_checkpoints']} (one more is written before the oldest is deleted)"]


def make_corpus_plan(cfg: ExperimentConfig, run_dtype: torch.dtype, zero: int, world: int, store_dtype: str,
                     ds_config: dict) -> dict:
    """A corpus job's plan: blocks, tokens and steps at this world size, per-rank model memory,
    and what a teacher cache of it would take (none is written: docs/general.md says why)."""
    from dskd import data, models
    from dskd.losses import mapped_pairs, uses_mlm
    from dskd.training import engine as eng

    training = eng.at_world_size(cfg.training, world)
    task = data.task_for(cfg, uses_mlm(cfg.losses))
    tokenizer = models.load_tokenizer(cfg.teacher)
    if cfg.teacher.path is not None:
        t_config = _any_config(cfg.teacher.path)
    elif cfg.teacher.arch is not None:
        t_config = models.arch_config(cfg.teacher.arch, len(tokenizer), 0, tokenizer.pad_token_id, "teacher.arch")
    else:
        raise DskdError("`dskd plan` needs `teacher.path` or `teacher.arch` to know the teacher's shape")
    if cfg.student.init is not None:
        s_config = _any_config(cfg.student.init, "student.init")
        init_layers, n_student = [], s_config.num_hidden_layers
    else:
        init_layers, n_student = models.student_layer_plan(cfg.student, t_config.num_hidden_layers)
        s_config = type(t_config).from_dict({**t_config.to_dict(), "num_hidden_layers": n_student}) \
            if cfg.student.init_from_teacher else models.arch_config(cfg.student.arch, t_config.vocab_size, 0,
                                                                    tokenizer.pad_token_id, "student.arch")
    pairs = mapped_pairs(cfg, cfg.losses, init_layers, n_student, t_config.num_hidden_layers)
    train_set, held_out = data.load_data(cfg, task, tokenizer)
    length, batch = cfg.data.max_length, training.batch_size * training.grad_accum * world
    steps_per_epoch = len(train_set) // batch
    size = cache.element_size(store_dtype)
    hidden = t_config.hidden_size
    # Per block, what the representation terms read of the teacher: every token's states (and
    # Q, K, V) at each mapped layer; a cache would also have to store them for each new mask.
    per_block = {"hidden_states": len(pairs) * length * hidden * size,
                 "attention_qkv": 3 * len(pairs) * length * hidden * size}
    teacher_params = _param_count(t_config, task.model_class)
    student_params = _param_count(s_config, task.model_class)
    return {
        "summary": f"{teacher_name(t_config, cfg.teacher.path)}, corpus, {len(train_set)} blocks x S={length}, "
                   f"{steps_per_epoch} steps/epoch at {world} rank(s)",
        "task": task.name,
        "corpus": {"train_blocks": len(train_set), "held_out_blocks": len(held_out), "block_length": length,
                   "train_tokens": len(train_set) * length, "global_batch_blocks": batch,
                   "tokens_per_step": batch * length, "steps_per_epoch": steps_per_epoch,
                   "steps": training.max_steps or int(steps_per_epoch * training.epochs), "mapped_pairs": [list(p) for p in pairs]},
        "cache": {"written": False, "dtype": store_dtype, "bytes_per_block": per_block,
                  "bytes_for_the_corpus": {k: v * len(train_set) for k, v in per_block.items()}},
        "memory_per_rank": {
            "run_dtype": str(run_dtype).replace("torch.", ""), "zero_stage": zero, "world_size": world,
            "teacher_params": teacher_params,
            "teacher_bytes_online": teacher_params * torch.tensor([], dtype=run_dtype).element_size(),
            "student_params": student_params, "student_bytes": student_bytes(student_params, run_dtype, zero, world),
            # Blocks are full: every batch is max_length long.
            "rss": estimate_rss(teacher_config=t_config, student_config=s_config, teacher_params=teacher_params,
                                student_params=student_params, dtype=run_dtype, zero=zero, world=world,
                                ds_config=ds_config, batch=training.batch_size, train_length=length,
                                eval_length=length, teacher_online=True,
                                data_bytes=TOKEN_BYTES * length * (len(train_set) + len(held_out)),
                                mapped_layers=len(pairs)),
        },
        "disk": disk_plan(student_params, run_dtype, zero, training.keep_checkpoints),
    }


def _any_config(path: str, key: str = "teacher.path"):
    """A model folder's config, whatever its head."""
    from transformers import AutoConfig

    from dskd import models

    models.register_model_types()
    source, hub = models.model_source(path, key)
    try:
        return AutoConfig.from_pretrained(source, **hub)
    except Exception as exc:
        raise DskdError(f"`{key}`: could not read a model config from {path}: {exc}") from None


def format_corpus_plan(plan: dict) -> str:
    c, m, k = plan["corpus"], plan["memory_per_rank"], plan["cache"]
    sb = m["student_bytes"]
    return "\n".join([
        plan["summary"], "",
        f"corpus: {c['train_blocks']} training blocks ({c['train_tokens']:,} tokens), {c['held_out_blocks']} held out; "
        f"{c['global_batch_blocks']} blocks ({c['tokens_per_step']:,} tokens) per optimizer step; "
        f"{c['steps']} steps",
        "teacher cache: not used by corpus jobs; it would take "
        + ", ".join(f"{name} {cache.human(v)}" for name, v in k["bytes_for_the_corpus"].items())
        + f" ({k['dtype']}) for this corpus, once more for each masking when masked-LM terms are on",
        "",
        f"model memory per rank ({m['run_dtype']}, ZeRO-{m['zero_stage']}, {m['world_size']} rank(s); weights and "
        "optimizer state only, the peak RSS estimate below adds the rest):",
        f"  teacher {m['teacher_params'] / 1e6:.1f}M params: {cache.human(m['teacher_bytes_online'])} (frozen, whole "
        "on every rank)",
        f"  student {m['student_params'] / 1e6:.1f}M params: {cache.human(sb['total'])} (weights "
        f"{cache.human(sb['weights'])}, gradients {cache.human(sb['gradients'])}, optimizer {cache.human(sb['optimizer'])})",
    ] + format_rss(m["rss"], cache.human) + format_disk(plan["disk"]))


def format_plan(plan: dict) -> str:
    if "corpus" in plan:
        return format_corpus_plan(plan)
    c, m = plan["cache"], plan["memory_per_rank"]
    lines = [plan["summary"], "", f"teacher cache ({c['dtype']}; stores {', '.join(c['fields'])}"
             + (f" for teacher layers {c['teacher_layers']}" if c["teacher_layers"] else "") + "):"]
    for split, s in c["splits"].items():
        parts = ", ".join(f"{k} {cache.human(v)}" for k, v in s["bytes"].items())
        lines.append(f"  {split:5s} {s['examples']} examples, {s['tokens']} tokens (mean {s['mean_length']:.1f}): "
                     f"{cache.human(s['total_bytes'])} ({parts})")
        if s["attention_as_maps_bytes"]:
            lines.append(f"        attention stored as L x L maps instead of Q/K would take "
                         f"{cache.human(s['attention_as_maps_bytes'])}")
    lines.append(f"  total {cache.human(c['total_bytes'])}, {cache.human(c['bytes_per_train_example'])} per train example")
    if c.get("refused"):
        lines.append(f"  not usable for this config: {c['refused']}")
    sb = m["student_bytes"]
    lines += [
        "",
        f"model memory per rank ({m['run_dtype']}, ZeRO-{m['zero_stage']}, {m['world_size']} rank(s); weights and "
        "optimizer state only, the peak RSS estimate below adds the rest):",
        f"  teacher {m['teacher_params'] / 1e6:.1f}M params: {cache.human(m['teacher_bytes_online'])} online, "
        "none with the cache",
        f"  student {m['student_params'] / 1e6:.1f}M params: {cache.human(sb['total'])} (weights "
        f"{cache.human(sb['weights'])}, gradients {cache.human(sb['gradients'])}, optimizer {cache.human(sb['optimizer'])})",
    ]
    if m["memory_bank_bytes"]:
        lines.append(f"  CoDIR memory banks (student + teacher side, on every rank): {cache.human(m['memory_bank_bytes'])}")
    lines += format_rss(m["rss"], cache.human)
    return "\n".join(lines + format_disk(plan["disk"]))
