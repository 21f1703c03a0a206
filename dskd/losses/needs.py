"""What the configured terms need from the models: the mapped (student, teacher) layer pairs,
and what a teacher cache must hold for them."""

from __future__ import annotations

from dskd.errors import DskdError
from dskd.losses.base import LOSS_REGISTRY, LayerwiseTerm, term_type
from dskd.models import resolve_layer_map
from dskd.teacher.cache import CACHEABLE, CacheSpec


def layerwise_losses(losses: dict) -> bool:
    return any(issubclass(LOSS_REGISTRY[term_type(n, spec)], LayerwiseTerm) for n, spec in losses.items())


def mapped_pairs(cfg, losses: dict, init_layers: list[int], n_student: int, n_teacher: int):
    """Every mapped (student layer, teacher layer) pair; none without a layer-wise term."""
    if not layerwise_losses(losses):
        if cfg.layer_map is not None:
            raise DskdError("`layer_map` is set but no loss term compares layers; add attention_kl or cls_cosine, "
                            "or drop layer_map")
        return ()
    return tuple(resolve_layer_map(cfg.layer_map, init_layers, n_student, n_teacher))


def spec_for(losses: dict, pairs, strict: bool = True) -> CacheSpec:
    """The cache a run with these loss terms and layer pairs reads. Terms with weight 0
    count too: a schedule stage may turn them on. A term that needs a teacher output the
    cache does not store (every token's hidden states, the attention values) is refused
    by name; ``strict=False`` (``dskd plan``) leaves it out instead."""
    fields = {"logits"}
    for name, spec in losses.items():
        kind = term_type(name, spec)
        cls = LOSS_REGISTRY[kind]
        if cls.uses_teacher:
            needs = set(cls.needs_for(spec))
            missing = sorted(needs - set(CACHEABLE))
            if missing and strict:
                raise DskdError(
                    f"`losses.{name}` ({kind}) needs the teacher's {', '.join(missing)}, which the teacher cache "
                    f"does not store (it stores {', '.join(CACHEABLE)}); run it with the online teacher "
                    "(`teacher.path` or `teacher.arch`, without `teacher.cache`)"
                )
            fields |= needs & set(CACHEABLE)
    layers = tuple(sorted({t for _, t in pairs})) if fields - {"logits"} else ()
    return CacheSpec(tuple(f for f in CACHEABLE if f in fields), layers)
