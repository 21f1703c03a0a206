"""CoDIR (Sun et al., EMNLP 2020): contrastive distillation on intermediate representations.

The student must pick the teacher's representation of the same example out of K
negatives drawn from a memory bank. Spec and provenance: ../shared/reference/methods.md
§3; our choices are listed in docs/methods.md ("CoDIR").

Per example, every mapped layer's sentence vector (``pool: cls`` as the released code,
or ``mean``: masked mean over real tokens, as the paper describes) is concatenated across
layers (student: its mapped layers; teacher: their partners), then projected by a
trainable head per side to 128 dimensions and L2-normalised: z_s, z_t. Both heads are
parameters of this term, so they are in the optimizer and the checkpoint.

Two memory banks [N_train, dim] hold momentum-averaged z_s (``memory_s``) and z_t
(``memory_t``), keyed by the example's dataset index. Loss forms (``form``):

* ``nce`` (the released code's CRD form): teacher-anchored scores against the student
  bank and student-anchored scores against the teacher bank, for the positive (the bank
  entry of the same index) and K negatives; P(j) = exp(z . m_j / tau) / Z with Z fixed
  at the first training batch (mean exp-score x N_train, averaged over ranks); then
  ``-[log h(pos) + sum log(1 - h(neg))]`` with h = P / (P + K / N_train), the two sides
  averaged.
* ``infonce`` (the paper's form): ``-log softmax`` of the live positive z_t . z_s against
  z_t . memory_s[negatives], over tau; with ``symmetric`` also the student-anchored twin
  against memory_t, averaged.

Negatives (``negatives``): ``label`` draws K training examples whose label differs from the
anchor's, without replacement when the pool is large enough (as the released code);
``random`` draws K uniformly among all other training examples, with replacement, for
regression tasks and unlabeled data: CoDIR's pre-training form on corpus blocks
(docs/general.md), where labels cannot define them.

Distributed consistency: every rank sees other examples, yet the banks must stay
identical. After scoring, each rank all-gathers (index, z_s, z_t) of its batch, and every
rank applies the same update in the same order (rank 0's rows first). Duplicated
indices in one update keep the last occurrence in that order, so the result does not
depend on scatter races. The banks, the Z constants and the sampling step counter are
buffers: saved in the checkpoint and restored exactly on resume. The sampling generator
is reseeded from (seed, step, rank) every step, so negatives need no RNG state of their own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dskd.errors import DskdError
from dskd.losses import LayerGeometry, LayerwiseTerm, register_loss

BANK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sample_label_negatives(anchor_labels: torch.Tensor, pools: dict[int, torch.Tensor], k: int,
                           generator: torch.Generator) -> torch.Tensor:
    """[B, K] dataset indices whose label differs from each anchor's."""
    out = torch.empty(len(anchor_labels), k, dtype=torch.long)
    for label in anchor_labels.unique().tolist():
        rows = (anchor_labels == label).nonzero().flatten()
        pool = pools[int(label)]
        replace = k >= len(pool)
        picks = torch.multinomial(torch.ones(len(rows), len(pool)), k, replacement=replace, generator=generator)
        out[rows] = pool[picks]
    return out


def sample_random_negatives(anchor_idx: torch.Tensor, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """[B, K] indices drawn uniformly among the other n - 1 examples (with replacement)."""
    draws = torch.randint(0, n - 1, (len(anchor_idx), k), generator=generator)
    return draws + (draws >= anchor_idx[:, None]).long()  # skip the anchor itself


def nce_loss(anchor: torch.Tensor, bank: torch.Tensor, candidates: torch.Tensor, tau: float, z: torch.Tensor,
             n: int) -> torch.Tensor:
    """CRD's NCE with uniform noise: ``candidates[:, 0]`` is the positive, the rest negatives."""
    scores = torch.exp(torch.einsum("bd,bkd->bk", anchor, bank[candidates].to(anchor.dtype)) / tau) / z
    k = candidates.shape[1] - 1
    noise = k / n
    log_h_pos = torch.log(scores[:, 0] / (scores[:, 0] + noise))
    log_1m_h_neg = torch.log(noise / (scores[:, 1:] + noise)).sum(-1)
    return -(log_h_pos + log_1m_h_neg).mean()


def infonce_loss(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, tau: float) -> torch.Tensor:
    """-log softmax of the positive among [positive, negatives] (scores / tau)."""
    pos = (anchor * positive).sum(-1, keepdim=True)
    neg = torch.einsum("bd,bkd->bk", anchor, negatives.to(anchor.dtype))
    logits = torch.cat([pos, neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(anchor), dtype=torch.long, device=anchor.device))


@register_loss("codir")
class CoDIR(LayerwiseTerm):
    """Contrastive distillation of the mapped layers' pooled states through a memory bank."""

    per_pair = False  # one loss over all mapped layers (their features are concatenated)

    def __init__(self, form: str = "nce", pool: str = "cls", negatives: str = "label", k: int = 100,
                 tau: float = 0.07, momentum: float = 0.5, dim: int = 128, symmetric: bool = True,
                 bank_dtype: str = "float32"):
        super().__init__()
        if form not in ("nce", "infonce"):
            raise ValueError(f"form must be 'nce' or 'infonce', got {form!r}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if negatives not in ("label", "random"):
            raise ValueError(f"negatives must be 'label' or 'random', got {negatives!r}")
        if bank_dtype not in BANK_DTYPES:
            raise ValueError(f"bank_dtype must be one of {', '.join(BANK_DTYPES)}, got {bank_dtype!r}")
        if k < 1 or dim < 1:
            raise ValueError("k and dim must be at least 1")
        if tau <= 0 or not 0 <= momentum < 1:
            raise ValueError("tau must be positive and momentum in [0, 1)")
        self.form, self.pool, self.negatives, self.k, self.tau = form, pool, negatives, k, tau
        self.momentum, self.dim, self.symmetric, self.bank_dtype = momentum, dim, symmetric, BANK_DTYPES[bank_dtype]
        self.needs = frozenset({pool})
        self.seed = 0
        self.pools: dict[int, torch.Tensor] = {}
        self.n = 0

    @classmethod
    def needs_for(cls, spec: dict) -> frozenset[str]:
        return frozenset({spec.get("pool", "cls")})

    @classmethod
    def gold_labels_for(cls, spec: dict) -> str:
        return "every" if spec.get("negatives", "label") == "label" else "none"  # label negatives: every row's class

    def _apply(self, fn, recurse=True):
        # DeepSpeed casts the whole module to the run's dtype (bf16/fp16); the banks keep
        # `bank_dtype`, and the normalisers and the step counter their own dtypes.
        dtypes = {name: buf.dtype for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, dtype in dtypes.items():
            if self._buffers[name].dtype != dtype:
                self._buffers[name] = self._buffers[name].to(dtype)
        return self

    def bind(self, geometry: LayerGeometry, key: str) -> None:
        layers = len(geometry.pairs)
        self.embed_s = nn.Linear(layers * geometry.student_hidden, self.dim)
        self.embed_t = nn.Linear(layers * geometry.teacher_hidden, self.dim)
        self.key = key

    def bind_job(self, job, key: str) -> None:
        """The memory banks are keyed by the training set's dataset indices."""
        train = job.train_set.with_format("numpy")  # through the index mapping of a `select`ed split
        if "label" not in job.train_set.column_names:  # a corpus job: blocks have no label
            if self.negatives == "label":
                raise DskdError(f"`{key}.negatives: label` draws negatives with another label, and corpus blocks have "
                                "none; set `negatives: random` (CoDIR's pre-training form, docs/general.md)")
            labels = torch.zeros(len(train), dtype=torch.long)
        else:
            labels = torch.as_tensor(train["label"])
        self.bind_data(labels, torch.as_tensor(train["idx"]).long(), job.task.is_regression, job.cfg.seed)

    def bind_data(self, labels: torch.Tensor, idx: torch.Tensor, is_regression: bool, seed: int) -> None:
        """Size the banks for the training set and build the negative pools; check the setup."""
        key = self.key
        n = int(idx.max()) + 1 if len(idx) else 0
        if len(idx) != n or not torch.equal(idx.sort().values, torch.arange(n)):
            raise DskdError(f"`{key}`: the training set's dataset indices (idx) are not 0..N-1; the memory bank is "
                            "keyed by them. Keep the `idx` column as dskd's loaders write it")
        if self.negatives == "label":
            if is_regression:
                raise DskdError(f"`{key}.negatives: label` needs class labels, and this task is a regression; "
                                "set `negatives: random`")
            by_index = torch.empty(n, dtype=torch.long)
            by_index[idx] = labels.long()
            for label in by_index.unique().tolist():
                self.pools[int(label)] = (by_index != label).nonzero().flatten()
            smallest = min((len(p) for p in self.pools.values()), default=0)
            if smallest == 0:
                raise DskdError(f"`{key}`: every training example has the same label, so there is no negative "
                                "with a different label; set `negatives: random`")
            if self.k > smallest:
                raise DskdError(f"`{key}.k` is {self.k}, more than the {smallest} training examples of the smallest "
                                "pool of negatives (examples whose label differs from the anchor's); lower k")
        elif self.k > n - 1:
            raise DskdError(f"`{key}.k` is {self.k}, but the training set has only {n - 1} other examples; lower k")
        self.n, self.seed = n, seed
        generator = torch.Generator().manual_seed(seed)
        bound = (self.dim / 3) ** -0.5  # the released code's uniform(-1/sqrt(dim/3), +1/sqrt(dim/3)) initialisation
        for name in ("memory_s", "memory_t"):
            bank = (torch.rand(n, self.dim, generator=generator) * 2 - 1) * bound
            self.register_buffer(name, bank.to(self.bank_dtype))
        self.register_buffer("z_s", torch.tensor(-1.0, dtype=torch.float64))
        self.register_buffer("z_t", torch.tensor(-1.0, dtype=torch.float64))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))

    # ------------------------------------------------------------------ the loss

    def _sample(self, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.step) * 9_973 + rank)
        if self.negatives == "label":
            return sample_label_negatives(labels.cpu(), self.pools, self.k, generator)
        return sample_random_negatives(idx.cpu(), self.n, self.k, generator)  # labels: None on corpus blocks

    def _normaliser(self, name: str, anchor, bank, candidates) -> torch.Tensor:
        """Z, fixed at the first training batch from that batch's mean exp-score, averaged over ranks."""
        z = getattr(self, name)
        if float(z) < 0:
            with torch.no_grad():
                scores = torch.exp(torch.einsum("bd,bkd->bk", anchor, bank[candidates].to(anchor.dtype)) / self.tau)
                value = scores.mean().double() * self.n
                value = _mean_over_ranks(value)
            z.fill_(float(value))
        return z.to(anchor.dtype)

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:
        fs = torch.cat([v.float() for v in student[self.pool]], dim=-1)
        ft = torch.cat([v.float() for v in teacher[self.pool]], dim=-1)
        if fs.shape[-1] != self.embed_s.in_features:
            raise DskdError(f"`{self.key}` compares all mapped layers at once; a stage that distils only some of them "
                            "cannot use it (drop `layers`/`per_layer` from the stages where it is on)")
        zs = F.normalize(self.embed_s(fs), dim=-1)
        zt = F.normalize(self.embed_t(ft), dim=-1)
        idx, labels = teacher["idx"], teacher["labels"]
        if teacher.get("split", "train") != "train":
            return self._held_out(zs, zt, idx, labels)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise DskdError(f"`{self.key}`: a batch holds dataset index {int(idx.max())}, outside the memory bank "
                            f"(0..{self.n - 1}): only training examples can be contrasted")
        negatives = self._sample(idx, labels).to(idx.device)
        if self.form == "nce":
            candidates = torch.cat([idx[:, None], negatives], dim=1)
            loss_t = nce_loss(zt, self.memory_s, candidates, self.tau,
                              self._normaliser("z_t", zt, self.memory_s, candidates), self.n)
            loss_s = nce_loss(zs, self.memory_t, candidates, self.tau,
                              self._normaliser("z_s", zs, self.memory_t, candidates), self.n)
            loss = (loss_t + loss_s) / 2
        else:
            loss = infonce_loss(zt, zs, self.memory_s[negatives], self.tau)
            if self.symmetric:
                loss = (loss + infonce_loss(zs, zt, self.memory_t[negatives], self.tau)) / 2
        if self.training:
            self._update(idx, zs.detach(), zt.detach())
        return loss

    def _held_out(self, zs, zt, idx, labels) -> torch.Tensor:
        """For examples outside the training set (a plateau rule's dev batches): the bank has
        no entry of their own, so both forms are scored as InfoNCE with the live positive
        against K negatives from the training banks; nothing is updated."""
        if self.negatives == "label":
            negatives = sample_label_negatives(labels.cpu(), self.pools, self.k, self._generator(idx))
        else:
            negatives = torch.randint(0, self.n, (len(idx), self.k), generator=self._generator(idx))
        negatives = negatives.to(zs.device)
        loss = infonce_loss(zt, zs, self.memory_s[negatives], self.tau)
        if self.symmetric:
            loss = (loss + infonce_loss(zs, zt, self.memory_t[negatives], self.tau)) / 2
        return loss

    def _generator(self, idx: torch.Tensor) -> torch.Generator:
        """Fixed per batch (seeded by its indices), so a held-out loss is comparable across checks."""
        return torch.Generator().manual_seed(self.seed * 7_919 + int(idx.sum()))

    @torch.no_grad()
    def _update(self, idx: torch.Tensor, zs: torch.Tensor, zt: torch.Tensor) -> None:
        """The same momentum update on every rank, from every rank's batch."""
        idx, zs, zt = _gather(idx), _gather(zs), _gather(zt)
        # Keep the last occurrence of a repeated index (in rank order): deterministic.
        last = torch.full((self.n,), -1, dtype=torch.long, device=idx.device)
        last.scatter_reduce_(0, idx, torch.arange(len(idx), device=idx.device), reduce="amax")
        keep = last[idx] == torch.arange(len(idx), device=idx.device)
        idx, zs, zt = idx[keep], zs[keep], zt[keep]
        for bank, z in ((self.memory_s, zs), (self.memory_t, zt)):
            mixed = bank[idx].float() * self.momentum + z.float() * (1 - self.momentum)
            bank[idx] = F.normalize(mixed, dim=-1).to(bank.dtype)
        self.step += 1


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()
