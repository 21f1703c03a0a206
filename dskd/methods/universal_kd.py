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
(``dskd.models.capture.forward_with_layers``), not only the mapped pairs. The teacher cache does
not store it, so a cached run is refused; the online teacher computes it for free (the
hidden states are returned anyway). The layer map is not used, but must be resolvable, as
for every layer-wise term.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dskd.errors import DskdError
from dskd.losses import LayerGeometry, LayerwiseTerm, register_loss

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
        from dskd import data
        from dskd.teacher import cache

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
