"""KroneckerBERT: a student whose linear maps are Kronecker products (Tahaei et al., NAACL 2022).

A weight ``W`` of shape ``[m, n]`` is replaced by ``A ⊗ B`` with ``A: [m1, n1]``, ``B: [m2, n2]``,
``m = m1*m2``, ``n = n1*n2``, which stores ``m1*n1 + m2*n2`` numbers instead of ``m*n``.

* :class:`KroneckerLinear` computes ``x (A ⊗ B)^T + b`` without forming ``A ⊗ B``: each input
  row is reshaped to ``X: [n1, n2]`` and ``Y = A X B^T`` (two matmuls) is the output row
  ``[m1*m2]``. ``(A ⊗ B)[i1*m2 + i2, j1*n2 + j2] = A[i1, j1] B[i2, j2]``, torch.kron's layout.
* :class:`KroneckerEmbedding` looks up rows of a ``[V, d]`` table ``A ⊗ B``: row
  ``i = i1*v2 + i2`` is ``A[i1] ⊗ B[i2]``, one outer product per token, the table never formed.
* :func:`nearest_kronecker` (Van Loan & Pitsianis): ``||W - A ⊗ B||_F`` equals
  ``||R - vec(A) vec(B)^T||_F`` for a rearrangement ``R`` of ``W``, so the best ``A, B`` are
  the top singular pair of ``R``.
* :func:`kroneckerize` turns a BERT/RoBERTa sequence classifier (the student, a copy of
  teacher layers) into a :class:`KroneckerBertForSequenceClassification` (or the RoBERTa
  one) whose factors are the nearest Kronecker products of the copied weights.

The factor shapes come from ``student.kronecker`` (``dskd.config.KroneckerConfig``): for each
kind of layer, the shape ``[m2, n2]`` of the small factor ``B``; ``A`` takes the rest. The
spec is stored in the model's config (``"kronecker"``, model type ``kronecker_bert`` /
``kronecker_roberta``), and importing this module registers both with transformers' Auto
classes, so a run's ``model/`` and ``dskd export`` load back with
``AutoModelForSequenceClassification.from_pretrained`` (or :func:`load_pretrained`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
)

from dskd.errors import DskdError

KEY = "student.kronecker"
# Kind of layer -> the linear maps of a BERT layer (paths inside `encoder.layer[i]`) it covers.
KINDS = {
    "attention": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
    "intermediate": ("intermediate.dense",),
    "output": ("output.dense",),
}
SPEC_KEYS = (*KINDS, "embeddings", "layers")


# ----------------------------------------------------------------------------- layers


def kronecker_linear(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None):
    """``x (a ⊗ b)^T + bias`` for ``x: [..., n1*n2]``: rows reshaped to ``X: [n1, n2]``, then ``a X b^T``."""
    (m1, n1), (m2, n2) = a.shape, b.shape
    y = torch.matmul(a, torch.matmul(x.reshape(-1, n1, n2), b.t()))  # [N, m1, m2]
    y = y.reshape(*x.shape[:-1], m1 * m2)
    return y + bias if bias is not None else y


class KroneckerLinear(nn.Module):
    """``y = x (A ⊗ B)^T + bias`` with ``A: [m1, n1]``, ``B: [m2, n2]``; in ``n1*n2``, out ``m1*m2``."""

    def __init__(self, shape_a, shape_b, bias: bool = True, device=None, dtype=None):
        super().__init__()
        (m1, n1), (m2, n2) = shape_a, shape_b
        self.in_features, self.out_features = n1 * n2, m1 * m2
        self.A = nn.Parameter(torch.empty(m1, n1, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(m2, n2, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(m1 * m2, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Entries of ``A ⊗ B`` are products of one entry of each: factors of std sqrt(std) give it std ``std``."""
        nn.init.normal_(self.A, std=math.sqrt(std))
        nn.init.normal_(self.B, std=math.sqrt(std))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kronecker_linear(x, self.A, self.B, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """``A ⊗ B`` as a ``[out, in]`` matrix (a reference for tests; the forward never forms it)."""
        return torch.kron(self.A, self.B)

    def dense_numel(self) -> int:
        return self.out_features * self.in_features + (self.out_features if self.bias is not None else 0)

    @property
    def compression(self) -> float:
        """Parameters of the dense layer over those of this one (bias included in both)."""
        return self.dense_numel() / sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, A={tuple(self.A.shape)}, "
                f"B={tuple(self.B.shape)}, bias={self.bias is not None}")


class KroneckerEmbedding(nn.Module):
    """A ``[num_embeddings, dim]`` lookup table ``A ⊗ B`` (``A: [v1, d1]``, ``B: [v2, d2]``,
    ``v1*v2 >= num_embeddings``): row ``i = i1*v2 + i2`` is ``A[i1] ⊗ B[i2]``. Rows past
    ``num_embeddings`` (when ``v2`` does not divide the vocabulary) are never looked up."""

    def __init__(self, num_embeddings: int, shape_a, shape_b, padding_idx=None, device=None, dtype=None):
        super().__init__()
        (v1, d1), (v2, d2) = shape_a, shape_b
        if v1 * v2 < num_embeddings:
            raise ValueError(f"A ⊗ B has {v1 * v2} rows, fewer than {num_embeddings} embeddings")
        self.num_embeddings, self.embedding_dim = num_embeddings, d1 * d2
        self.padding_idx = padding_idx  # kept for code that reads it; the row is not pinned to zero
        self.A = nn.Parameter(torch.empty(v1, d1, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(v2, d2, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.A, std=math.sqrt(std))
        nn.init.normal_(self.B, std=math.sqrt(std))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        v2 = self.B.shape[0]
        a, b = self.A[torch.div(ids, v2, rounding_mode="floor")], self.B[ids % v2]
        return (a[..., :, None] * b[..., None, :]).reshape(*ids.shape, self.embedding_dim)

    def dense_weight(self) -> torch.Tensor:
        return torch.kron(self.A, self.B)[: self.num_embeddings]

    def dense_numel(self) -> int:
        return self.num_embeddings * self.embedding_dim

    @property
    def compression(self) -> float:
        return self.dense_numel() / (self.A.numel() + self.B.numel())

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, A={tuple(self.A.shape)}, B={tuple(self.B.shape)}"


KRONECKER_MODULES = (KroneckerLinear, KroneckerEmbedding)


# ------------------------------------------------------------------- nearest Kronecker


def rearrange(weight: torch.Tensor, shape_a, shape_b) -> torch.Tensor:
    """Van Loan–Pitsianis ``R: [m1*n1, m2*n2]`` with ``R[(i1, j1), (i2, j2)] = W[i1*m2 + i2, j1*n2 + j2]``,
    so that ``W = A ⊗ B`` exactly when ``R = vec(A) vec(B)^T`` (row-major vec)."""
    (m1, n1), (m2, n2) = shape_a, shape_b
    if tuple(weight.shape) != (m1 * m2, n1 * n2):
        raise ValueError(f"weight {tuple(weight.shape)} is not [{m1}*{m2}, {n1}*{n2}]")
    return weight.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def nearest_kronecker(weight: torch.Tensor, shape_a, shape_b) -> tuple[torch.Tensor, torch.Tensor]:
    """``A, B`` minimising ``||W - A ⊗ B||_F``: the top singular pair of :func:`rearrange` (W),
    the singular value split as its square root on each side. Computed in float64 and
    returned in ``W``'s dtype; the sign is fixed (the largest entry of ``A`` is positive)
    so the result does not depend on the SVD routine's sign choice."""
    r = rearrange(weight.detach().double(), shape_a, shape_b)
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    scale = s[0].sqrt()
    a, b = u[:, 0] * scale, vh[0] * scale
    if a[a.abs().argmax()] < 0:
        a, b = -a, -b
    return a.reshape(shape_a).to(weight.dtype), b.reshape(shape_b).to(weight.dtype)


# ---------------------------------------------------------------- HF config and models


@strict
class KroneckerBertConfig(BertConfig):
    model_type = "kronecker_bert"
    # The factor spec (the keys of dskd.config.KroneckerConfig); see factor_shapes.
    kronecker: dict | None = None


@strict
class KroneckerRobertaConfig(RobertaConfig):
    model_type = "kronecker_roberta"
    kronecker: dict | None = None


class _KroneckerMixin:
    """Builds the dense model, then swaps the layers the spec names for Kronecker ones."""

    def __init__(self, config):
        super().__init__(config)
        self._factorise()

    def _factorise(self) -> None:
        if not self.config.kronecker:  # a config without a spec is the dense model
            return
        for path, module in planned_modules(self, self.config.kronecker, self.config).items():
            parent, _, name = path.rpartition(".")
            setattr(self.get_submodule(parent), name, module)

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, KRONECKER_MODULES):
            from transformers import initialization as init

            std = math.sqrt(self.config.initializer_range)
            init.normal_(module.A, mean=0.0, std=std)
            init.normal_(module.B, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
            return
        super()._init_weights(module)


class KroneckerBertForSequenceClassification(_KroneckerMixin, BertForSequenceClassification):
    config_class = KroneckerBertConfig


class KroneckerRobertaForSequenceClassification(_KroneckerMixin, RobertaForSequenceClassification):
    config_class = KroneckerRobertaConfig


# Bare encoders and masked-LM models: the students of corpus jobs (docs/general.md).
class KroneckerBertModel(_KroneckerMixin, BertModel):
    config_class = KroneckerBertConfig


class KroneckerBertForMaskedLM(_KroneckerMixin, BertForMaskedLM):
    config_class = KroneckerBertConfig


class KroneckerRobertaModel(_KroneckerMixin, RobertaModel):
    config_class = KroneckerRobertaConfig


class KroneckerRobertaForMaskedLM(_KroneckerMixin, RobertaForMaskedLM):
    config_class = KroneckerRobertaConfig


CLASSES = {
    "bert": (KroneckerBertConfig, KroneckerBertForSequenceClassification),
    "roberta": (KroneckerRobertaConfig, KroneckerRobertaForSequenceClassification),
}
# model type -> transformers Auto class -> the Kronecker model of that kind
KINDS_OF_MODEL = {
    "bert": {AutoModelForSequenceClassification: KroneckerBertForSequenceClassification,
             AutoModel: KroneckerBertModel, AutoModelForMaskedLM: KroneckerBertForMaskedLM},
    "roberta": {AutoModelForSequenceClassification: KroneckerRobertaForSequenceClassification,
                AutoModel: KroneckerRobertaModel, AutoModelForMaskedLM: KroneckerRobertaForMaskedLM},
}
for _config_cls, _ in CLASSES.values():
    try:
        AutoConfig.register(_config_cls.model_type, _config_cls)
    except ValueError:  # already registered (a reloaded module)
        pass
for _kinds in KINDS_OF_MODEL.values():
    for _auto, _model_cls in _kinds.items():
        try:
            _auto.register(_model_cls.config_class, _model_cls)
        except ValueError:
            pass


def _kind_of(model: nn.Module):
    """The transformers Auto class ``model`` is an instance of the kind of."""
    name = type(model).__name__
    if name.endswith("ForMaskedLM"):
        return AutoModelForMaskedLM
    if name.endswith("ForSequenceClassification"):
        return AutoModelForSequenceClassification
    if getattr(model, "base_model", None) is model:
        return AutoModel
    raise DskdError(f"`{KEY}`: cannot factor a {name}; KroneckerBERT students are BERT/RoBERTa encoders, "
                    "sequence classifiers or masked-LM models")


def load_pretrained(path, **kwargs) -> nn.Module:
    """Load an exported KroneckerBERT (or any) sequence classifier; importing this module is
    what makes ``AutoModelForSequenceClassification.from_pretrained`` know the model type."""
    return AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)


# ----------------------------------------------------------------------- the spec


def spec_dict(spec) -> dict:
    """A ``KroneckerConfig`` (or a mapping with its keys) as a plain JSON-able dict."""
    raw = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else dict(spec or {})
    unknown = set(raw) - set(SPEC_KEYS)
    if unknown:
        raise DskdError(f"`{KEY}`: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(SPEC_KEYS)}")
    out = {k: (list(raw[k]) if raw.get(k) is not None else None) for k in SPEC_KEYS}
    if all(out[k] is None for k in (*KINDS, "embeddings")):
        raise DskdError(f"`{KEY}` compresses nothing; set the factor shape [m2, n2] of at least one of "
                        f"{', '.join(f'`{KEY}.{k}`' for k in (*KINDS, 'embeddings'))}")
    for kind in (*KINDS, "embeddings"):
        shape = out[kind]
        if shape is not None and (len(shape) != 2 or not all(isinstance(v, int) and v >= 1 for v in shape)):
            raise DskdError(f"`{KEY}.{kind}` must be the shape [m2, n2] of the factor B (two positive integers), "
                            f"got {shape!r}")
    if out["layers"] is not None and (not out["layers"] or any(v < 1 for v in out["layers"])):
        raise DskdError(f"`{KEY}.layers` lists the 1-based student layers to compress (null: all), got {out['layers']}")
    return out


def factor_shapes(kind: str, weight_shape, shape_b) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(shape of A, shape of B)`` for a ``[out, in]`` weight (``[vocab, hidden]`` table for
    ``embeddings``, whose vocabulary is rounded up to a multiple of ``m2``)."""
    (m, n), (m2, n2) = weight_shape, shape_b
    if kind == "embeddings":
        if n % n2:
            raise DskdError(f"`{KEY}.embeddings` is {list(shape_b)}: {n2} does not divide the hidden size {n} of the "
                            "word embeddings; choose [v2, d2] with d2 dividing it")
        return (-(-m // m2), n // n2), (m2, n2)
    if m % m2 or n % n2:
        raise DskdError(f"`{KEY}.{kind}` is {list(shape_b)}, which does not divide the [{m}, {n}] weights it "
                        f"factors ([out, in]: m2 must divide {m} and n2 must divide {n})")
    return (m // m2, n // n2), (m2, n2)


def _layer_shapes(config) -> dict[str, tuple[int, int]]:
    h, i = config.hidden_size, config.intermediate_size
    return {"attention": (h, h), "intermediate": (i, h), "output": (h, i)}


def planned_modules(model: nn.Module, spec: dict, config) -> dict[str, nn.Module]:
    """Module path -> the fresh (randomly initialised) Kronecker module the spec puts there."""
    spec = spec_dict(spec)
    # A bare encoder has no `<base>.` in its module paths; a model with a head has.
    base = f"{model.base_model_prefix}." if hasattr(model, model.base_model_prefix) else ""
    blocks = model.get_submodule(f"{base}encoder.layer")
    layers = spec["layers"] if spec["layers"] is not None else list(range(1, len(blocks) + 1))
    for layer in layers:
        if layer > len(blocks):
            raise DskdError(f"`{KEY}.layers` names layer {layer}, but the student has {len(blocks)} layers")
    like = next(model.parameters())
    kw = {"device": like.device, "dtype": like.dtype}
    planned: dict[str, nn.Module] = {}
    shapes = _layer_shapes(config)
    for kind, paths in KINDS.items():
        if spec[kind] is None:
            continue
        shape_a, shape_b = factor_shapes(kind, shapes[kind], spec[kind])
        for layer in sorted(set(layers)):
            for path in paths:
                full = f"{base}encoder.layer.{layer - 1}.{path}"
                old = model.get_submodule(full)
                planned[full] = KroneckerLinear(shape_a, shape_b, bias=old.bias is not None, **kw)
                planned[full].reset_parameters(config.initializer_range)
    if spec["embeddings"] is not None:
        full = f"{base}embeddings.word_embeddings"
        shape_a, shape_b = factor_shapes("embeddings", (config.vocab_size, config.hidden_size), spec["embeddings"])
        planned[full] = KroneckerEmbedding(config.vocab_size, shape_a, shape_b, config.pad_token_id, **kw)
        planned[full].reset_parameters(config.initializer_range)
    return planned


def kronecker_config(config, spec):
    """The KroneckerBERT config of a dense BERT/RoBERTa config (shapes checked against the spec)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in CLASSES:
        raise DskdError(f"`{KEY}` supports BERT and RoBERTa students; this student is {model_type!r}: drop "
                        f"`{KEY}`, or distil into a BERT or RoBERTa student (`student.arch.model_type`)")
    spec = spec_dict(spec)
    shapes = _layer_shapes(config)
    for kind in KINDS:
        if spec[kind] is not None:
            factor_shapes(kind, shapes[kind], spec[kind])
    if spec["embeddings"] is not None:
        factor_shapes("embeddings", (config.vocab_size, config.hidden_size), spec["embeddings"])
    if spec["layers"] is not None and max(spec["layers"]) > config.num_hidden_layers:
        raise DskdError(f"`{KEY}.layers` names layer {max(spec['layers'])}, but the student has "
                        f"{config.num_hidden_layers} layers")
    raw = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
    return CLASSES[model_type][0].from_dict({**raw, "kronecker": spec})


def kroneckerize(model: nn.Module, spec, init: str = "nearest", seed: int = 0) -> nn.Module:
    """A new KroneckerBERT model holding ``model``'s weights, with the layers ``spec`` names
    factored: ``init="nearest"`` sets each ``A, B`` to the nearest Kronecker product of the
    dense weight it replaces (the copied teacher weight, as the paper), ``"random"`` keeps a
    random init (std sqrt(initializer_range) per factor; for students built from config, whose
    random dense weights have no structure worth keeping). Everything else (embeddings left
    dense, LayerNorms, pooler, classifier) is copied. ``model`` itself is left unchanged."""
    if init not in ("nearest", "random"):
        raise ValueError(f"init must be 'nearest' or 'random', got {init!r}")
    if getattr(model.config, "kronecker", None):
        raise DskdError(f"`{KEY}`: the student is already a KroneckerBERT model")
    config = kronecker_config(model.config, spec)
    kind = _kind_of(model)
    if kind is AutoModelForMaskedLM and config.kronecker["embeddings"] is not None:
        raise DskdError(f"`{KEY}.embeddings` factors the word-embedding table, which the masked-LM head's output "
                        "projection shares (tied); leave the embeddings dense in a job with masked-LM terms")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = KINDS_OF_MODEL[model.config.model_type][kind](config)
    new.to(next(model.parameters()).dtype)
    source = model.state_dict()
    state = {}
    for name, tensor in new.state_dict().items():
        module_path, _, param = name.rpartition(".")
        target = new.get_submodule(module_path)
        if isinstance(target, KRONECKER_MODULES) and param in ("A", "B"):
            if init == "random":
                state[name] = tensor
            elif param == "A":
                dense = source[f"{module_path}.weight"]
                if isinstance(target, KroneckerEmbedding) and dense.shape[0] < target.A.shape[0] * target.B.shape[0]:
                    pad = target.A.shape[0] * target.B.shape[0] - dense.shape[0]
                    dense = torch.cat([dense, dense.new_zeros(pad, dense.shape[1])])
                a, b = nearest_kronecker(dense, tuple(target.A.shape), tuple(target.B.shape))
                state[f"{module_path}.A"], state[f"{module_path}.B"] = a, b
            continue
        state[name] = source[name]
    new.load_state_dict(state, strict=True)
    new.train(model.training)
    return new


# ------------------------------------------------------------------------ counting


def parameter_counts(model: nn.Module) -> dict:
    """Parameters of the model and of its Kronecker layers, against the dense model they stand for.

    ``compression``: dense parameters of the replaced layers / their Kronecker parameters;
    ``model_compression``: the whole dense model / this one."""
    total = sum(p.numel() for p in model.parameters())
    modules = [m for m in model.modules() if isinstance(m, KRONECKER_MODULES)]
    kron = sum(p.numel() for m in modules for p in m.parameters())
    dense = sum(m.dense_numel() for m in modules)
    return {
        "total": total,
        "dense_total": total - kron + dense,
        "replaced_modules": len(modules),
        "replaced_dense": dense,
        "replaced_kronecker": kron,
        "compression": dense / kron if kron else 1.0,
        "model_compression": (total - kron + dense) / total,
    }


def describe(model: nn.Module) -> str:
    """One ``[student]`` line: what was factored, parameter counts and compression."""
    spec = spec_dict(model.config.kronecker)
    c = parameter_counts(model)
    kinds = ", ".join(f"{k} B={spec[k]}" for k in (*KINDS, "embeddings") if spec[k] is not None)
    layers = "all layers" if spec["layers"] is None else f"layers {spec['layers']}"
    return (f"[student] KroneckerBERT ({kinds}; {layers}): {c['replaced_modules']} layers factored, "
            f"{c['replaced_dense']:,} -> {c['replaced_kronecker']:,} params ({c['compression']:.1f}x); "
            f"model {c['dense_total']:,} -> {c['total']:,} params ({c['model_compression']:.2f}x)")
