"""What dskd needs to know of each encoder family: where its layers and their self-attention
live, whether Q and K reproduce its attention, and how ``teacher.arch``/``student.arch`` map
onto its config. Logit, hidden-state and [CLS] terms read only the model's outputs
(``hidden_states``) and need nothing from here; the capture hooks, the attention terms and
copying teacher layers into a student do (docs/design.md, "Encoder families")."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

from torch import nn

from dskd.errors import DskdError


@dataclass(frozen=True)
class Family:
    """``blocks``: the ``nn.ModuleList`` of layers, from the base model (None when layers share
    weights). ``attention``: the self-attention module, from a layer. ``projections``: its query,
    key and value ``nn.Linear`` names. ``attention_refused``: why its attention is not
    ``softmax(Q Kᵀ/√d + padding mask)`` (None: it is, verified against transformers' code)."""

    blocks: str | None
    attention: str
    projections: tuple[str, str, str] = ("query", "key", "value")
    attention_refused: str | None = None


BERT_LIKE = Family("encoder.layer", "attention.self")
FAMILIES = {
    "bert": BERT_LIKE,
    "roberta": BERT_LIKE,
    # ELECTRA's attention is BERT's code (same scaling, additive mask); only the embeddings differ.
    "electra": BERT_LIKE,
    # One group of layers run num_hidden_layers times: layer k is the k-th call of the shared module.
    "albert": Family(None, "attention"),
    "distilbert": Family("transformer.layer", "attention", ("q_lin", "k_lin", "v_lin")),
    "deberta-v2": Family("encoder.layer", "attention.self", ("query_proj", "key_proj", "value_proj"),
                         attention_refused="disentangled attention (its scores add content-to-position and "
                                           "position-to-content terms to Q Kᵀ, scaled by 1/√(3d))"),
    # RoBERTa's code under other names (tests/test_families.py checks their attention too).
    "xlm-roberta": BERT_LIKE,
    "camembert": BERT_LIKE,
    # dskd's own KroneckerBERT keeps BERT's and RoBERTa's modules.
    "kronecker_bert": BERT_LIKE,
    "kronecker_roberta": BERT_LIKE,
}
# The families `teacher.arch.model_type` / `student.arch.model_type` build, each tested end to end
# (tests/test_families.py); keep in step with ArchConfig.model_type.
TESTED = ("bert", "roberta", "electra", "albert", "distilbert", "deberta-v2")
EXACT_ATTENTION = tuple(name for name in TESTED if FAMILIES[name].attention_refused is None)
ALTERNATIVES = "hidden_cosine, tinybert_hidden, cls_cosine, pkd or codir"  # terms that read hidden states only


def accepted_inputs(model: nn.Module, inputs: dict) -> dict:
    """``inputs`` without the ones ``model`` does not take (DistilBERT has no token_type_ids, which a
    BERT tokenizer makes); a BERT teacher and a DistilBERT student read the same batch."""
    names = _forward_inputs(type(model))
    return inputs if names is None else {k: v for k, v in inputs.items() if k in names}


@functools.lru_cache(maxsize=None)
def _forward_inputs(cls: type) -> frozenset[str] | None:
    try:
        params = inspect.signature(cls.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return None
    if "input_ids" not in params:  # a wrapper that passes everything on
        return None
    return frozenset(params)


def family_of(config) -> Family | None:
    return FAMILIES.get(getattr(config, "model_type", ""))


def _walk(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
    return module


def check_loaded(config, key: str) -> None:
    """Refuse a model whose layers do not line up with its hidden states (ALBERT with several
    layers per group repeats the group, so hidden state k would not be layer k)."""
    if getattr(config, "model_type", "") == "albert" and getattr(config, "inner_group_num", 1) != 1:
        raise DskdError(f"`{key}`: an ALBERT with inner_group_num={config.inner_group_num} runs several layers per "
                        "repetition, so its hidden states are not one per layer; dskd supports inner_group_num 1 "
                        "(every released ALBERT)")


def check_attention(config, who: str, terms: list[str]) -> None:
    """Refuse attention terms (those reading Q/K/V) on a family whose attention Q and K do not reproduce."""
    model_type = getattr(config, "model_type", None) or "unknown"
    family = FAMILIES.get(model_type)
    if family is not None and family.attention_refused is None:
        position_type = getattr(config, "position_embedding_type", "absolute")
        if position_type in (None, "absolute"):
            return
        why = f"position_embedding_type={position_type!r} (relative position terms in the scores)"
    else:
        why = family.attention_refused if family is not None else "an attention dskd has not verified"
    named = ", ".join(f"`{term}`" for term in terms) or "the attention terms"
    raise DskdError(
        f"{named} recompute attention as softmax(Q Kᵀ/√d + padding mask), but the {who} is {model_type}, which "
        f"uses {why}; drop {'it' if len(terms) == 1 else 'them'} and distil with hidden-state or [CLS] terms "
        f"({ALTERNATIVES}), or use a {who} of a family whose attention they reproduce ({', '.join(EXACT_ATTENTION)})"
    )


def attention_layers(model: nn.Module, who: str) -> tuple[list[nn.Module], bool]:
    """The self-attention modules of ``model`` and whether its layers share them (ALBERT: one
    module per group, called once per layer in layer order). Unshared: one module per layer."""
    config = model.config
    family = family_of(config) or BERT_LIKE
    base = getattr(model, model.base_model_prefix, model)
    if family.blocks is None:  # ALBERT
        groups = getattr(getattr(base, "encoder", None), "albert_layer_groups", None)
        if groups is None:
            raise DskdError(f"the {who} ({type(model).__name__}) has no `encoder.albert_layer_groups`")
        modules = [_walk(layer, family.attention) for group in groups for layer in group.albert_layers]
        shared = True
    else:
        blocks = _walk(base, family.blocks)
        if not isinstance(blocks, nn.ModuleList):
            raise DskdError(
                f"the {who} ({type(model).__name__}) has no `{family.blocks}` blocks; attention terms support "
                f"{', '.join(EXACT_ATTENTION)} encoders")
        modules = [_walk(block, family.attention) for block in blocks]
        shared = False
    q, k, _ = family.projections
    for i, attn in enumerate(modules, 1):
        if attn is None or not all(isinstance(getattr(attn, n, None), nn.Module) for n in (q, k)) \
                or not hasattr(attn, "attention_head_size"):
            raise DskdError(f"layer {i} of the {who} has no self-attention with `{q}`/`{k}` projections")
    return modules, shared


def layer_prefix(model: nn.Module, keys) -> str | None:
    """The state-dict prefix of the numbered layers (``<base>.encoder.layer.``), or None when the
    layers share weights (ALBERT: a shallower copy takes the shared group as it is)."""
    family = family_of(model.config) or BERT_LIKE
    if family.blocks is None:
        groups = getattr(model.config, "num_hidden_groups", 1)
        if groups != 1:
            raise DskdError(
                f"cannot copy teacher layers: this ALBERT has num_hidden_groups={groups}, and which group a layer "
                "runs depends on the depth; set `student.init_from_teacher: false` and `student.arch` instead")
        return None
    # A bare encoder (AutoModel) has no `<base>.` in its keys; a model with a head has.
    base = f"{model.base_model_prefix}." if hasattr(model, model.base_model_prefix) else ""
    prefix = f"{base}{family.blocks}."
    if not any(k.startswith(prefix) for k in keys):
        raise DskdError(
            f"cannot copy teacher layers: the teacher has no `{prefix}N` blocks; initialising from teacher layers "
            f"supports {', '.join(TESTED)} encoders. Set `student.init_from_teacher: false` and `student.arch` instead"
        )
    return prefix


def arch_overrides(model_type: str, arch, hidden: dict) -> dict:
    """The family's config keys for an ``arch`` whose generic keys (BERT's names) are ``hidden``."""
    embedding = arch.embedding_size or arch.hidden
    if model_type in ("albert", "electra"):
        extra = {"embedding_size": embedding}
        if model_type == "albert":
            extra["classifier_dropout_prob"] = arch.dropout
        return {**hidden, **extra}
    if model_type == "distilbert":
        return {"dim": arch.hidden, "n_layers": arch.layers, "n_heads": arch.heads, "hidden_dim": arch.intermediate,
                "dropout": arch.dropout, "attention_dropout": arch.dropout, "seq_classif_dropout": arch.dropout,
                **{k: v for k, v in hidden.items() if k in ("vocab_size", "max_position_embeddings", "num_labels",
                                                            "pad_token_id")}}
    if model_type == "deberta-v2":
        # As the released DeBERTa-v3 models: relative attention, no absolute positions in the input.
        return {**hidden, "relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_biased_input": False,
                "position_buckets": 256, "norm_rel_ebd": "layer_norm", "share_att_key": True,
                "max_relative_positions": -1, "pooler_dropout": arch.dropout}
    return hidden
