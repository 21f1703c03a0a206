"""``dskd train-probes``: Universal-KD's teacher pseudo-classifiers, one linear probe per teacher
layer on its [CLS] vector, fitted once and saved for ``losses.universal_kd.teacher_probes``."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dskd.config import check_trained_teacher
from dskd.errors import DskdError
from dskd.losses import term_type
from dskd.methods.universal_kd import MANIFEST, PROBES_FORMAT, PROBES_VERSION, WEIGHTS
from dskd.runtime.files import follow_umask


def _config_layers(cfg) -> list[int] | None:
    """``teacher_layers`` of the config's universal_kd term, if it has one."""
    for name, spec in cfg.losses.items():
        if term_type(name, spec) == "universal_kd" and spec.get("teacher_layers") is not None:
            return sorted(spec["teacher_layers"])
    return None


def _prepare_output(out: Path, overwrite: bool) -> None:
    if out.is_file():
        raise DskdError(f"--output {out} is a file; give a folder for the probes")
    if out.is_dir() and any(out.iterdir()):
        try:
            ours = json.loads((out / MANIFEST).read_text()).get("format") == PROBES_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise DskdError(f"--output {out} is not empty and holds no teacher probes; choose another folder")
        if not overwrite:
            raise DskdError(f"--output {out} already holds teacher probes; pass --overwrite to replace them")


@torch.no_grad()
def collect_cls(model: nn.Module, dataset, tokenizer, batch_size: int, layers: list[int], device) -> tuple:
    """Every example's [CLS] vector after each of ``layers``, [N, len(layers), d] float32 on CPU, and labels."""
    from dskd import data, models

    feats, labels = [], []
    for batch in data.eval_loader(dataset, tokenizer, batch_size):
        inputs = {k: v.to(device) for k, v in models.model_inputs(batch, model).items()}
        states = model(**inputs, output_hidden_states=True).hidden_states
        feats.append(torch.stack([states[i][:, 0] for i in layers], 1).float().cpu())
        labels.append(batch["labels"])
    return torch.cat(feats), torch.cat(labels)


def fit_probes(x: torch.Tensor, y: torch.Tensor, num_labels: int, epochs: int, lr: float, batch_size: int,
               seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One linear softmax classifier per layer on ``x`` [N, L, d] with labels ``y`` [N]:
    weights [L, C, d] and biases [L, C] acting on the raw vectors.

    The features are standardised per layer and dimension (the teacher's [CLS] vectors
    have a few huge dimensions), the classifiers start at zero and are fitted with Adam on
    mini-batches of a seeded permutation; the standardisation is then folded into W and b.
    Adam is elementwise and the layers' losses are independent, so fitting them together
    is the same as one at a time."""
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    n, layers, dim = x.shape
    weight = torch.zeros(layers, num_labels, dim, requires_grad=True)
    bias = torch.zeros(layers, num_labels, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            logits = torch.einsum("bld,lcd->blc", z[rows], weight) + bias  # [b, L, C]
            loss = F.cross_entropy(logits.reshape(-1, num_labels), y[rows].repeat_interleave(layers), reduction="sum")
            optimizer.zero_grad()
            (loss / len(rows)).backward()
            optimizer.step()
    with torch.no_grad():
        folded = weight / std[:, None, :]
        return folded.detach().clone(), (bias - torch.einsum("lcd,ld->lc", folded, mean)).detach().clone()


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> list[float]:
    if len(y) == 0:
        return [float("nan")] * weight.shape[0]
    pred = (torch.einsum("bld,lcd->blc", x, weight) + bias).argmax(-1)  # [N, L]
    return (pred == y[:, None]).double().mean(0).tolist()


def train_probes(cfg, out: Path, batch_size: int | None = None, epochs: int = 20, lr: float = 1e-2,
                 fit_batch_size: int = 64, layers: list[int] | None = None, overwrite: bool = False,
                 argv: list[str] | None = None) -> dict:
    """``dskd train-probes``: the teacher's pseudo-classifiers, fitted and saved to ``out``.

    One process: the teacher's pass over the training set is the only real cost, and the
    fits are tiny. Launched on several ranks it is refused (run it without a launcher)."""
    import dataclasses

    from safetensors.torch import save_file

    from dskd import data, models
    from dskd.runtime import dist
    from dskd.teacher import cache
    from dskd.teacher.online import load_teacher

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DskdError("`dskd train-probes` runs in one process (one teacher pass, then tiny linear fits); "
                        "run it without a launcher")
    for name, value in (("--epochs", epochs), ("--fit-batch-size", fit_batch_size)):
        if value < 1:
            raise DskdError(f"{name} must be at least 1, got {value}")
    if lr <= 0:
        raise DskdError(f"--lr must be positive, got {lr}")
    task = data.get_task(cfg.data.task)
    if task.is_regression:
        raise DskdError(f"`data.task` is {task.name}, a regression task: Universal-KD's pseudo-classifiers need "
                        "class labels")
    if cfg.teacher.path is None and cfg.teacher.arch is None:
        raise DskdError("`dskd train-probes` runs the teacher: set `teacher.path` or `teacher.arch`")
    check_trained_teacher(cfg, "train-probes")
    out = Path(out)
    _prepare_output(out, overwrite)
    batch_size = batch_size or 2 * cfg.training.batch_size
    if batch_size < 1:
        raise DskdError(f"--batch-size must be at least 1, got {batch_size}")
    tokenizer = models.load_tokenizer(cfg.teacher)
    train_set, dev_set = data.load_data(cfg, task, tokenizer)
    train_set, _, _ = data.training_split(cfg, task, train_set)  # the labels the student trains on
    model = load_teacher(cfg, task, tokenizer)
    depth, hidden = model.config.num_hidden_layers, model.config.hidden_size
    chosen = sorted(set(layers or _config_layers(cfg) or range(1, depth + 1)))
    if chosen[0] < 1 or chosen[-1] > depth:
        raise DskdError(f"--layers {chosen}: the teacher has layers 1 to {depth}")
    device = dist.device()
    model = models.freeze(model, torch.float32, device)

    def log(*parts) -> None:
        print(*parts, file=sys.stderr, flush=True)

    log(f"[probes] teacher pass: {len(train_set)} train + {len(dev_set)} dev examples, layers {chosen}, "
        f"{len(train_set) * len(chosen) * hidden * 4 / 2**20:.1f} MiB of [CLS] vectors")
    x_train, y_train = collect_cls(model, train_set, tokenizer, batch_size, chosen, device)
    x_dev, y_dev = collect_cls(model, dev_set, tokenizer, batch_size, chosen, device)
    labelled = y_train != data.UNLABELED  # the probes fit gold labels: rows of `data.unlabeled` have none
    x_train, y_train = x_train[labelled], y_train[labelled]
    weight, bias = fit_probes(x_train, y_train.long(), task.num_labels, epochs, lr, fit_batch_size, cfg.seed)
    train_acc = probe_accuracy(x_train, y_train.long(), weight, bias)
    dev_acc = probe_accuracy(x_dev, y_dev.long(), weight, bias)
    manifest = {
        "format": PROBES_FORMAT, "version": PROBES_VERSION,
        "teacher": cache.teacher_fingerprint(cfg.teacher, cfg.seed),
        "teacher_source": cfg.teacher.path or f"teacher.arch {dataclasses.asdict(cfg.teacher.arch)}",
        "task": task.name, "num_labels": task.num_labels, "hidden": hidden, "teacher_depth": depth,
        "layers": chosen,
        "dev_accuracy": {f"L{i}": a for i, a in zip(chosen, dev_acc, strict=True)},
        "train_accuracy": {f"L{i}": a for i, a in zip(chosen, train_acc, strict=True)},
        "examples": {"train": len(y_train), "dev": len(y_dev)},
        "fit": {"epochs": epochs, "lr": lr, "batch_size": fit_batch_size, "seed": cfg.seed,
                "features": "float32, standardised (folded into the weights)"},
        "command": list(argv or []),
    }
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tensors = {}
    for k, i in enumerate(chosen):
        tensors[f"L{i}.weight"] = weight[k].contiguous()
        tensors[f"L{i}.bias"] = bias[k].contiguous()
    save_file(tensors, str(partial / WEIGHTS))
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: its presence means complete
    follow_umask(partial)  # safetensors writes its file 0o600
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return manifest
