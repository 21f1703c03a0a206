"""Universal-KD (Wu et al., EMNLP 2021): match intermediate layers in output space.

Spec and provenance: ../shared/reference/methods.md §4.4 (the idea is confirmed, the
details are not); our choices are listed in docs/methods.md ("Universal-KD").

Every chosen layer of both models gets a *pseudo-classifier* on its [CLS] vector:

    q^t_i = softmax(W^t_i h^t_i[CLS])   teacher layer i  (trained first, frozen, from a file)
    q^s_j = softmax(W^s_j h^s_j[CLS])   student layer j  (trainable, a parameter of the term)

Because both map their layer into the C classes of the task, teacher and student may differ
in depth, width and head count. Each student layer attends over the teacher layers
(ALP-KD's attention-based layer projection, Passban et al. 2021):

    alpha_{j,i} = softmax_i( q^s_j . q^t_i / attention_temperature )
    target_j    = sum_i alpha_{j,i} q^t_i
    L_uni       = sum_j  mean_batch  KL(target_j || q^s_j)        (distance: kl)
                  sum_j  mean_batch  sum_c (target_j - q^s_j)_c^2  (distance: mse)

With ``detach_attention: false`` (default, as ALP-KD) the gradient also flows through
alpha into the student's pseudo-classifiers and layers; ``true`` treats alpha as a constant.

The teacher's pseudo-classifiers come from ``dskd train-probes`` (``train_probes`` below):
one pass of the frozen teacher over the training set collects every layer's [CLS] vector,
then one linear classifier per layer is fitted on the gold labels (mini-batch Adam on the
standardised vectors, the standardisation folded back into the weights), its dev accuracy
reported, and all saved to a folder (``probes.safetensors`` + ``manifest.json``). The term
reads that folder (``losses.universal_kd.teacher_probes``) and refuses one made for another
teacher, task, width or without a layer it needs. The probes are buffers of the term (in
checkpoints, not in the optimizer); the student's are ``nn.Linear`` modules created in
``bind`` under the run's seed (in the optimizer and checkpoints).

The term needs ``cls_all``: the [CLS] vector after every layer of both models
(``dskd.capture.forward_with_layers``), not only the mapped pairs. The teacher cache does
not store it, so a cached run is refused; the online teacher computes it for free (the
hidden states are returned anyway). The layer map is not used, but must be resolvable, as
for every layer-wise term.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dskd.errors import DskdError
from dskd.losses import LayerGeometry, LayerwiseTerm, register_loss, term_type

PROBES_FORMAT = "dskd-universal-kd-probes"
PROBES_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "probes.safetensors"
DISTANCES = ("kl", "mse")


def _check_layers(value, name: str) -> list[int] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise ValueError(f"{name} must be null (every layer) or a non-empty list of 1-based layer numbers, "
                         f"got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{name} lists a layer twice: {value!r}")
    return sorted(value)


def read_manifest(folder: Path, key: str) -> dict:
    """The manifest of a ``dskd train-probes`` folder; refuses anything else naming ``key``."""
    hint = "write it with `dskd train-probes --config C --output DIR`"
    if not folder.exists():
        raise DskdError(f"`{key}`: {folder} does not exist; {hint}")
    path = folder / MANIFEST
    if not path.is_file() or not (folder / WEIGHTS).is_file():
        raise DskdError(f"`{key}`: {folder} is not a teacher-probe folder (no {MANIFEST} and {WEIGHTS}); {hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DskdError(f"`{key}`: {path} is corrupt ({exc}); rewrite it with `dskd train-probes`") from None
    if manifest.get("format") != PROBES_FORMAT or manifest.get("version") != PROBES_VERSION:
        raise DskdError(f"`{key}`: {folder} holds {manifest.get('format')!r} version {manifest.get('version')!r}, "
                        f"not {PROBES_FORMAT!r} version {PROBES_VERSION}; {hint}")
    return manifest


@register_loss("universal_kd")
class UniversalKD(LayerwiseTerm):
    """Universal-KD: every chosen student layer's pseudo-classifier fits an attention-weighted
    mix of the teacher layers' pseudo-classifiers (see the module docstring)."""

    per_pair = False  # one value over all chosen layers, whatever the layer map
    needs = frozenset({"cls_all"})

    def __init__(self, teacher_probes: str | None = None, student_layers: list | None = None,
                 teacher_layers: list | None = None, distance: str = "kl", attention_temperature: float = 1.0,
                 detach_attention: bool = False):
        super().__init__()
        if teacher_probes is not None and not isinstance(teacher_probes, str):
            raise ValueError(f"teacher_probes must be the folder `dskd train-probes` wrote, got {teacher_probes!r}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be 'kl' or 'mse', got {distance!r}")
        if attention_temperature <= 0:
            raise ValueError("attention_temperature must be positive")
        self.teacher_probes = teacher_probes
        self.student_layers = _check_layers(student_layers, "student_layers")
        self.teacher_layers = _check_layers(teacher_layers, "teacher_layers")
        self.distance, self.attention_temperature, self.detach_attention = distance, attention_temperature, \
            detach_attention
        self.classifiers = nn.ModuleDict()
        self.manifest: dict = {}
        self.s_layers: list[int] = []
        self.t_layers: list[int] = []
        self.key = "losses.universal_kd"
        self._logs: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ setup

    def bind(self, geometry: LayerGeometry, key: str) -> None:
        from safetensors.torch import load_file

        from dskd.config import resolve_path

        self.key = key
        if self.teacher_probes is None:
            raise DskdError(f"`{key}.teacher_probes` is not set: train the teacher's pseudo-classifiers first with "
                            f"`dskd train-probes --config C --output DIR`, then set `{key}.teacher_probes: DIR`")
        folder = Path(resolve_path(self.teacher_probes))
        manifest = read_manifest(folder, f"{key}.teacher_probes")
        where = f"`{key}.teacher_probes` ({folder})"
        if manifest["hidden"] != geometry.teacher_hidden:
            raise DskdError(f"{where} holds probes of a teacher of hidden size {manifest['hidden']}; this teacher's is "
                            f"{geometry.teacher_hidden}: train them for this teacher with `dskd train-probes`")
        depth = geometry.teacher_depth or manifest["teacher_depth"]
        if manifest["teacher_depth"] != depth:
            raise DskdError(f"{where} holds probes of a {manifest['teacher_depth']}-layer teacher; this teacher has "
                            f"{depth} layers: train them for this teacher with `dskd train-probes`")
        s_depth = geometry.student_depth or max(s for s, _ in geometry.pairs)
        s_layers = self.student_layers or list(range(1, s_depth + 1))
        t_layers = self.teacher_layers or list(range(1, depth + 1))
        for name, layers, n in (("student_layers", s_layers, s_depth), ("teacher_layers", t_layers, depth)):
            if max(layers) > n:
                raise DskdError(f"`{key}.{name}` lists layer {max(layers)}, but the {name.split('_')[0]} has {n} "
                                "layers")
        missing = sorted(set(t_layers) - set(manifest["layers"]))
        if missing:
            raise DskdError(f"{where} has probes for teacher layers {manifest['layers']}, not for {missing}, which "
                            f"`{key}.teacher_layers` needs; rerun `dskd train-probes` (it trains every layer unless "
                            "`--layers` or `teacher_layers` narrows it)")
        state = load_file(str(folder / WEIGHTS))
        try:
            weight = torch.stack([state[f"L{i}.weight"] for i in t_layers]).float()
            bias = torch.stack([state[f"L{i}.bias"] for i in t_layers]).float()
        except KeyError as exc:
            raise DskdError(f"{where}: {WEIGHTS} lacks {exc.args[0]}; rewrite it with `dskd train-probes`") from None
        if tuple(weight.shape[1:]) != (manifest["num_labels"], manifest["hidden"]):
            raise DskdError(f"{where}: {WEIGHTS} holds tensors of shape {tuple(weight.shape[1:])}, not "
                            f"(num_labels, hidden) = ({manifest['num_labels']}, {manifest['hidden']}); rewrite it")
        self.manifest, self.s_layers, self.t_layers = manifest, s_layers, t_layers
        self.register_buffer("teacher_weight", weight)  # [I, C, d_t], frozen: not a parameter
        self.register_buffer("teacher_bias", bias)  # [I, C]
        for j in s_layers:  # drawn under build_loss_terms' seeded block: every rank starts alike
            self.classifiers[f"L{j}"] = nn.Linear(geometry.student_hidden, manifest["num_labels"])

    def bind_run(self, cfg, key: str) -> None:
        from dskd import cache, data

        task = data.get_task(cfg.data.task)
        if cfg.teacher.cache is not None:
            raise DskdError(f"`{key}` needs the [CLS] vector of every teacher layer (cls_all), which the teacher "
                            "cache does not store; run it with the online teacher (`teacher.path` or "
                            "`teacher.arch`, without `teacher.cache`)")
        where = f"`{key}.teacher_probes` ({self.teacher_probes})"
        if self.manifest["task"] != task.name or self.manifest["num_labels"] != task.num_labels:
            raise DskdError(f"{where} holds probes for task {self.manifest['task']} ({self.manifest['num_labels']} "
                            f"labels); this run is {task.name} ({task.num_labels}): train them with this config")
        if cache.teacher_fingerprint(cfg.teacher, cfg.seed) != self.manifest["teacher"]:
            raise DskdError(f"{where} were trained on another teacher ({self.manifest.get('teacher_source')}, "
                            f"fingerprint {self.manifest['teacher']}); this run's teacher differs: rerun "
                            "`dskd train-probes` with this config")
        name = key.split(".", 1)[1]
        for i, stage in enumerate(cfg.schedule):
            on = stage.losses.get(name, 0) if stage.losses else cfg.losses[name]["weight"]
            if stage.teacher is not None and on > 0:
                raise DskdError(f"`schedule[{i}].teacher` ({stage.name}) replaces the teacher `{key}`'s probes were "
                                f"trained on; turn `{name}` off in that stage")

    # ------------------------------------------------------------------ the loss

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:
        hs, ht = student["cls_all"], teacher["cls_all"]
        if len(ht) < max(self.t_layers) or len(hs) < max(self.s_layers):
            raise DskdError(f"`{self.key}`: got [CLS] vectors of {len(hs)} student and {len(ht)} teacher layers, "
                            f"fewer than the configured layers need")
        dtype = torch.promote_types(hs[0].dtype, torch.float32)  # fp32 for bf16/fp16 runs, fp64 stays
        with torch.no_grad():
            feats = torch.stack([ht[i - 1] for i in self.t_layers], 1).to(dtype)  # [B, I, d_t]
            q_t = F.softmax(torch.einsum("bid,icd->bic", feats, self.teacher_weight.to(dtype))
                            + self.teacher_bias.to(dtype), dim=-1)  # [B, I, C]
        # Called as modules (not a fused matmul) so ZeRO-3 gathers their parameters.
        z_s = torch.stack([self.classifiers[f"L{j}"](hs[j - 1]).to(dtype) for j in self.s_layers], 1)  # [B, J, C]
        return self.loss_from_logits(z_s, q_t)

    def loss_from_logits(self, z_s: torch.Tensor, q_t: torch.Tensor) -> torch.Tensor:
        """L_uni from the student's pseudo-logits [B, J, C] and the teacher's probabilities [B, I, C]."""
        log_q_s = F.log_softmax(z_s, dim=-1)
        q_s = log_q_s.exp()
        scores = torch.einsum("bjc,bic->bji", q_s.detach() if self.detach_attention else q_s, q_t)
        alpha = F.softmax(scores / self.attention_temperature, dim=-1)  # over teacher layers i
        target = torch.einsum("bji,bic->bjc", alpha, q_t)
        if self.distance == "kl":
            per = (torch.xlogy(target, target) - target * log_q_s).sum(-1)  # [B, J]
        else:
            per = (target - q_s).pow(2).sum(-1)
        per_layer = per.mean(0)  # [J]
        self._logs = {f"L{j}": v.detach() for j, v in zip(self.s_layers, per_layer, strict=True)}
        self.last_alpha = alpha.detach()
        return per_layer.sum()

    def extra_logs(self) -> dict[str, torch.Tensor]:
        return dict(self._logs)


# ------------------------------------------------------------ dskd train-probes


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
def collect_cls(model: nn.Module, dataset, pad_id: int, batch_size: int, layers: list[int], device) -> tuple:
    """Every example's [CLS] vector after each of ``layers``, [N, len(layers), d] float32 on CPU, and labels."""
    from dskd import models, trainer

    feats, labels = [], []
    for batch in trainer._eval_loader(dataset, pad_id, batch_size):
        inputs = {k: v.to(device) for k, v in models.model_inputs(batch).items()}
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

    from dskd import cache, data, engine as eng, models, trainer

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
    out = Path(out)
    _prepare_output(out, overwrite)
    batch_size = batch_size or 2 * cfg.training.batch_size
    if batch_size < 1:
        raise DskdError(f"--batch-size must be at least 1, got {batch_size}")
    tokenizer = models.load_tokenizer(cfg.teacher)
    train_set, dev_set = trainer.load_data(cfg, task, tokenizer)
    train_set, _, _ = trainer.training_split(cfg, task, train_set)  # the labels the student trains on
    model = trainer.load_teacher(cfg, task, tokenizer)
    depth, hidden = model.config.num_hidden_layers, model.config.hidden_size
    chosen = sorted(set(layers or _config_layers(cfg) or range(1, depth + 1)))
    if chosen[0] < 1 or chosen[-1] > depth:
        raise DskdError(f"--layers {chosen}: the teacher has layers 1 to {depth}")
    device = eng.device()
    model = models.freeze(model, torch.float32, device)

    def log(*parts) -> None:
        print(*parts, file=sys.stderr, flush=True)

    log(f"[probes] teacher pass: {len(train_set)} train + {len(dev_set)} dev examples, layers {chosen}, "
        f"{len(train_set) * len(chosen) * hidden * 4 / 2**20:.1f} MiB of [CLS] vectors")
    pad_id = tokenizer.pad_token_id
    x_train, y_train = collect_cls(model, train_set, pad_id, batch_size, chosen, device)
    x_dev, y_dev = collect_cls(model, dev_set, pad_id, batch_size, chosen, device)
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
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return manifest
