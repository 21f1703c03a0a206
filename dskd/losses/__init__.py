"""Loss terms: one signature, one registry.

``base`` holds the term classes every method builds on (``LossTerm``, ``LayerwiseTerm``),
the registry (``@register_loss``) and the config plumbing (validation, building, what a
teacher cache must hold); ``logits`` and ``layers`` the basic terms. Methods that need more
than a term (``dskd.methods``) register theirs from their own modules.
"""

from dskd.kernels import attention_log_probs, average_heads  # noqa: F401  (re-exported: the monitor draws maps with them)
from dskd.losses.base import (  # noqa: F401
    KERNELS, LOSS_REGISTRY, RESERVED_KEYS, LayerGeometry, LayerwiseTerm, LossTerm, build_loss_terms, build_term,
    check_unlabeled_rows, register_loss, term_type, validate_loss_terms,
)
from dskd.losses.layers import (  # noqa: F401
    AttentionKL, ClsCosine, HiddenCosine, MiniLM, PatientKD, TinyBertAttention, TinyBertHidden, attention_kl, attention_scores,
    head_groups,
)
from dskd.losses.logits import AnnealingKD, ContinuationKD, HardLabelLoss, SoftCrossEntropy, SoftLabelKD  # noqa: F401
from dskd.losses.mlm import MaskedLMKD, MaskedLMLoss, teacher_head_reader, uses_mlm  # noqa: F401
from dskd.losses.needs import layerwise_losses, mapped_pairs, spec_for  # noqa: F401
