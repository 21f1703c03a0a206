"""RW-KD (Lu et al., Findings of EMNLP 2021): a meta-learner, trained alongside the student,
gives every training example its own weight between the label loss and the teacher loss.

Per example i of a batch:

    CE_i = cross-entropy with the gold label
    KD_i = T^2 KL(softmax(z_t / T) || softmax(z_s / T))
    w_i  = g_phi(CE_i, KD_i, p_t(y_i))          (detached inputs; sigmoid output in (0, 1))
    loss = mean_i [ w_i CE_i + (1 - w_i) KD_i ]

``g_phi`` is a small MLP whose last layer starts at zero, so every w_i starts at 0.5 (the
plain 0.5 CE + 0.5 KD mix). The paper's meta-learner inputs are unverified; these three are
ours: how wrong the student is on the label, how far it is from the teacher, and how much
the teacher believes the label.

The meta update (Meta-Weight-Net / L2RW style), every ``meta_every`` optimizer steps, before
the student's own step: a one-step SGD look-ahead of the student with the weighted loss
(``theta' = theta - eta grad_theta loss(theta, phi)``, keeping the graph to phi), then the
cross-entropy of ``theta'`` on a batch of held-out examples (``data.holdout``), whose
gradient with respect to phi (second order, through the look-ahead) updates phi with Adam.
eta is the student's current learning rate unless ``inner_lr`` is set. The meta-gradient is
averaged over ranks, so every rank's meta-learner stays identical.

The look-ahead is a functional call of the student with its full weights
(``torch.func.functional_call``). Under ZeRO 0-2 every rank holds them, so it is exact and
touches neither the weights nor the gradients DeepSpeed manages (``torch.autograd.grad``
does not accumulate into ``.grad``, where ZeRO's reduction hooks live). ZeRO-3 partitions
the weights, and a look-ahead of partitioned weights would need every layer gathered twice
with a graph kept across the gathers; it is refused with an error instead. Attention runs
the math SDPA kernel inside the look-ahead because the fused kernels have no double
backward.

The meta-learner is deliberately not a submodule: DeepSpeed's optimizer would otherwise
decay its weights although the student loss gives it no gradient. Its weights and Adam
state travel in the term's ``get_extra_state``, which is part of the module's state dict
and so of every DeepSpeed checkpoint: resume is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dskd.runtime import dist
from dskd.errors import DskdError
from dskd.kernels import soft_kl_rows
from dskd.losses import LossTerm, register_loss


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def meta_learner(hidden: int) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    nn.init.zeros_(net[2].weight)
    nn.init.zeros_(net[2].bias)
    return net


@register_loss("rw_kd")
class ReweightedKD(LossTerm):
    """Per-example weights between CE and soft-label KD from a meta-learned network (see module doc)."""

    gold_labels = "every"  # the CE of every example, and its meta batches

    def __init__(self, temperature: float = 2.0, hidden: int = 16, meta_lr: float = 1e-3, meta_every: int = 1,
                 inner_lr: float = 0.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        if hidden < 1 or meta_every < 1:
            raise ValueError("hidden and meta_every must be at least 1")
        if meta_lr <= 0 or inner_lr < 0:
            raise ValueError("meta_lr must be positive and inner_lr non-negative (0: the student's current LR)")
        self.temperature, self.meta_every, self.inner_lr = temperature, meta_every, inner_lr
        learner = meta_learner(hidden)
        optimizer = torch.optim.Adam(learner.parameters(), lr=meta_lr)
        # Plain attributes, not submodules (see the module doc).
        object.__setattr__(self, "learner", learner)
        object.__setattr__(self, "meta_optimizer", optimizer)
        self._logs: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------- the loss

    def per_example(self, zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor):
        """(CE_i, KD_i, p_t(y_i)) for a batch of logits."""
        if zs.shape[-1] == 1:
            raise DskdError("`rw_kd` weighs a classification loss against the teacher's; it does not apply to "
                            "regression tasks")
        t = self.temperature
        ce = F.cross_entropy(_at_least_fp32(zs), labels, reduction="none")
        kd = soft_kl_rows(zs, zt, t) * (t * t)
        believed = torch.softmax(_at_least_fp32(zt), -1).gather(1, labels[:, None]).squeeze(1)
        return ce, kd, believed

    def weights(self, ce: torch.Tensor, kd: torch.Tensor, believed: torch.Tensor) -> torch.Tensor:
        features = torch.stack([ce.detach(), kd.detach(), believed.detach()], dim=1)
        self.learner.to(features.device)
        features = features.to(next(self.learner.parameters()).dtype)
        return torch.sigmoid(self.learner(features).squeeze(1))

    def mixed(self, zs, zt, labels, detach_weights: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ce, kd, believed = self.per_example(zs, zt, labels)
        w = self.weights(ce, kd, believed)
        if detach_weights:
            w = w.detach()
        return (w * ce + (1 - w) * kd).mean(), w

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:
        loss, w = self.mixed(student["logits"], teacher["logits"], teacher["labels"], detach_weights=True)
        self._logs["weight_mean"] = w.mean().detach()
        return loss

    def extra_logs(self) -> dict[str, torch.Tensor]:
        return dict(self._logs)

    # ---------------------------------------------------------- the meta update

    def bind_job(self, job, key: str) -> None:
        """The meta batches need held-out examples, and the look-ahead the student's full weights."""
        if job.extras.get("holdout") is None:
            raise DskdError(f"`{key}` learns its weights on held-out training examples; set `data.holdout` "
                            "(e.g. 0.05 keeps 5% of the training set out of training for its meta batches)")
        if job.zero_stage == 3:
            raise DskdError(f"`{key}`: the meta-learner's look-ahead needs the student's full weights on every "
                            f"rank, which ZeRO-3 partitions ({job.ds_file}); use ZeRO stage 0, 1 or 2")

    def before_micro_step(self, step, batch: dict) -> dict:
        """Every ``meta_every`` optimizer steps, before the first micro-step: one meta update."""
        if step.micro != 0 or step.step % self.meta_every:
            return batch
        device = batch["input_ids"].device
        meta_batch = holdout_batch(step.job, step.step, device)
        teacher_logits = step.job.teacher.outputs(batch, frozenset({"logits"}), (), "train")["logits"]
        self.meta_update(step.engine.module.model, batch, teacher_logits, meta_batch, step.engine.get_lr()[0])
        return batch

    def meta_update(self, student: nn.Module, batch: dict, teacher_logits: torch.Tensor, meta_batch: dict,
                    student_lr: float) -> torch.Tensor:
        """One meta-learner step from a look-ahead of ``student`` (see module doc); returns the meta loss."""
        from torch.func import functional_call
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from dskd.models import model_inputs

        params = {n: p for n, p in student.named_parameters() if p.requires_grad}
        buffers = dict(student.named_buffers())
        eta = self.inner_lr or student_lr
        with sdpa_kernel(SDPBackend.MATH):
            zs = functional_call(student, {**params, **buffers}, args=(), kwargs=model_inputs(batch, student))["logits"]
            loss, _ = self.mixed(zs, teacher_logits, batch["labels"], detach_weights=False)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
            ahead = {n: p if g is None else p - eta * g for (n, p), g in zip(params.items(), grads, strict=True)}
            meta_logits = functional_call(student, {**ahead, **buffers}, args=(),
                                          kwargs=model_inputs(meta_batch, student))["logits"]
            meta_loss = F.cross_entropy(_at_least_fp32(meta_logits), meta_batch["labels"])
        meta_grads = torch.autograd.grad(meta_loss, list(self.learner.parameters()))
        if dist.world_size() > 1:
            flat = torch.cat([g.reshape(-1) for g in meta_grads]).to(dist.device())
            torch.distributed.all_reduce(flat)
            flat = flat.to(meta_grads[0].device) / dist.world_size()
            meta_grads = torch.split(flat, [g.numel() for g in meta_grads])
        for p, g in zip(self.learner.parameters(), meta_grads, strict=True):
            p.grad = g.reshape(p.shape).detach().clone()
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        self._logs["meta_ce"] = meta_loss.detach()
        return meta_loss.detach()

    # ------------------------------------------------------------ checkpointing

    def get_extra_state(self) -> dict:
        return {"learner": self.learner.state_dict(), "optimizer": self.meta_optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.learner.load_state_dict(state["learner"])
        self.meta_optimizer.load_state_dict(state["optimizer"])


def holdout_batch(job, step: int, device) -> dict:
    """This rank's meta batch for optimizer step ``step``: a function of (seed, step, rank)
    only, so a resumed run draws the same ones."""
    from dskd import data

    generator = torch.Generator().manual_seed(job.cfg.seed * 1_000_003 + step * dist.world_size() + dist.rank())
    holdout = job.extras["holdout"]
    rows = torch.randperm(len(holdout), generator=generator)[: job.training.batch_size].tolist()
    return {k: v.to(device) for k, v in data.collate([holdout[i] for i in rows], job.tokenizer).items()}
