"""Read internal representations out of a model with forward hooks, not model edits.

``transformers`` 5 runs BERT-style attention through SDPA, which returns no attention
probabilities, and the eager path returns them *after* attention-dropout (rows that no
longer sum to 1 in training). Instead of forcing eager attention on every layer we hook
the query and key projections of the mapped layers only and keep their outputs, reshaped
to ``[B, heads, S, head_dim]``. The losses recompute the dropout-free distribution
``softmax(Q K^T / sqrt(head_dim) + mask)`` from them. Every other layer, and the model's
own attention computation, keeps its fast kernel; the extra cost is one ``Q K^T`` per
mapped layer inside the loss (see docs/design.md). Terms that also need the value
projections (MiniLM's value relation, need ``attention_v``) make the capture hook
``value`` too, on first use only, so runs that never ask for V pay nothing for it.

This is exact for encoders whose attention scores are ``Q K^T / sqrt(head_dim)`` plus the
padding mask: BERT, RoBERTa, ELECTRA, ALBERT and DistilBERT (``dskd.models.families`` says where
each keeps its layers and projections); the others are refused by name (DeBERTa's disentangled
attention). ALBERT's layers share one module, so its hooks count calls: the k-th call in a
forward is layer k.
"""

from __future__ import annotations

import torch
from torch import nn

from dskd.errors import DskdError
from dskd.models import families


class QKCapture:
    """Keeps the query/key projections of chosen (1-based) layers from the last forward.

    Hooks are installed once for every layer that may be needed; ``active`` picks which
    of them store anything on the next forward, so a stage that distils one layer pays
    for one. Call ``take(layers)`` after the forward to collect and clear them. The value
    projections are hooked only once ``hook_values()`` is called (``take_values``).
    """

    def __init__(self, model: nn.Module, layers: list[int], who: str):
        families.check_attention(model.config, who, [])
        modules, self.shared = families.attention_layers(model, who)
        depth = model.config.num_hidden_layers if self.shared else len(modules)
        self.who = who
        self.layers = sorted(set(layers))
        self._active: set[int] = set()
        self._calls: dict[str, int] = {}  # shared layers: calls of each projection in this forward
        self._store: dict[tuple[int, str], torch.Tensor] = {}
        self._handles = []
        self._names = (families.family_of(model.config) or families.BERT_LIKE).projections
        self._values_hooked = False
        for layer in self.layers:
            if not 1 <= layer <= depth:
                raise DskdError(f"the {who} has {depth} layers; layer {layer} does not exist")
        # Shared: every distinct module is hooked once and tells layers apart by its call count.
        self._attention = dict(enumerate({id(m): m for m in modules}.values())) if self.shared else \
            {layer: modules[layer - 1] for layer in self.layers}
        for layer, attn in self._attention.items():
            for part, name in zip("qk", self._names[:2]):
                self._handles.append(getattr(attn, name).register_forward_hook(
                    self._hook(layer, part, int(attn.attention_head_size))))

    @property
    def active(self) -> set[int]:
        return self._active

    @active.setter
    def active(self, layers) -> None:
        """Set before each forward: the layers to keep; restarts the shared layers' call count."""
        self._active = set(layers)
        self._calls.clear()

    def hook_values(self) -> None:
        """Also keep the value projections of the active layers; idempotent."""
        if self._values_hooked:
            return
        name = self._names[2]
        for layer, attn in self._attention.items():
            if not isinstance(getattr(attn, name, None), nn.Module):
                raise DskdError(f"layer {layer} of the {self.who} has no value projection (`{name}`)")
            self._handles.append(getattr(attn, name).register_forward_hook(
                self._hook(layer, "v", int(attn.attention_head_size))))
        self._values_hooked = True

    def _hook(self, layer: int, part: str, head_dim: int):
        def hook(module, inputs, output):
            at = layer
            if self.shared:
                at = self._calls[part] = self._calls.get(part, 0) + 1
            if at in self._active:
                b, s, _ = output.shape
                self._store[(at, part)] = output.view(b, s, -1, head_dim).transpose(1, 2)

        return hook

    def take(self, layers: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        try:
            return [(self._store[(layer, "q")], self._store[(layer, "k")]) for layer in layers]
        except KeyError as exc:
            raise RuntimeError(f"layer {exc.args[0][0]} was not captured; was it active during the forward?") from None
        finally:
            self._store.clear()

    def take_values(self, layers: list[int]) -> list[torch.Tensor]:
        """The value projections [B, heads, S, head_dim] of ``layers`` from the last forward
        (call before ``take``, which clears the store)."""
        try:
            return [self._store.pop((layer, "v")) for layer in layers]
        except KeyError as exc:
            raise RuntimeError(f"the values of layer {exc.args[0][0]} were not captured; was it active and "
                               "hook_values() called before the forward?") from None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def cls_vectors(hidden_states: tuple[torch.Tensor, ...], layers: list[int]) -> list[torch.Tensor]:
    """The first token's vector ([CLS] / <s>) after each 1-based layer; index 0 is the embeddings."""
    return [hidden_states[layer][:, 0] for layer in layers]


def mean_vectors(hidden_states: tuple[torch.Tensor, ...], layers: list[int], mask: torch.Tensor) -> list[torch.Tensor]:
    """Each 1-based layer's states averaged over the example's real tokens (padding excluded)."""
    weights = mask.to(hidden_states[0].dtype)[:, :, None]
    count = weights.sum(1).clamp_min(1.0)
    return [(hidden_states[layer] * weights).sum(1) / count for layer in layers]


POOLED = ("cls", "mean")  # per-layer sentence vectors a term may ask for
STATES = POOLED + ("hidden", "embeddings", "cls_all")  # needs read from ``hidden_states``


def forward_with_layers(model: nn.Module, inputs: dict, needs: frozenset[str], capture: QKCapture | None,
                        layers: list[int]) -> dict:
    """One forward of ``model`` returning ``logits`` (when in ``needs``; ``last_hidden``, the
    encoder's output states, when asked) and, for the 1-based ``layers``, what
    ``needs`` asks for: ``cls`` (first-token vectors), ``mean`` (masked mean over tokens),
    ``hidden`` (every token's states [B, S, d] after each layer), ``attention_qk`` (via
    ``capture``) and ``attention_v`` (the value projections [B, heads, S, head_dim], via
    ``capture``). Per-layer outputs are lists aligned with ``layers``; ``embeddings`` (the
    embedding output, hidden state 0) is one tensor, returned whenever ``layers`` is not empty.
    ``cls_all`` (also only when ``layers`` is not empty) is the [CLS] vector of *every* layer,
    ``[layer 1, ..., layer L]``, whatever the mapped pairs are (Universal-KD's pseudo-classifiers).
    The same path serves the student (with autograd) and the teacher (under no_grad)."""
    want_qk = bool(layers) and "attention_qk" in needs
    want_v = bool(layers) and "attention_v" in needs
    if want_qk or want_v:
        if capture is None:
            raise RuntimeError("`attention_qk`/`attention_v` is needed but no QKCapture is installed on this model")
        if want_v:
            capture.hook_values()
        capture.active = set(layers)
    # A masked-LM head would project every token onto the vocabulary: unless `logits` are asked
    # for, only the encoder runs (the masked-LM terms apply the head to masked tokens only).
    vocabulary_head = model.get_output_embeddings() is not None if hasattr(model, "get_output_embeddings") else False
    runner = getattr(model, model.base_model_prefix, model) if vocabulary_head and "logits" not in needs else model
    try:
        want_states = bool(layers) and bool(needs & set(STATES))
        out = runner(**families.accepted_inputs(runner, inputs), output_hidden_states=want_states)
    finally:
        if capture is not None:
            capture.active = set()
    result = {"logits": out["logits"]} if "logits" in out else {}
    if "last_hidden" in needs:
        result["last_hidden"] = out["last_hidden_state"]
    if layers and "cls" in needs:
        result["cls"] = cls_vectors(out["hidden_states"], layers)
    if layers and "mean" in needs:
        result["mean"] = mean_vectors(out["hidden_states"], layers, inputs["attention_mask"])
    if layers and "hidden" in needs:
        result["hidden"] = [out["hidden_states"][layer] for layer in layers]
    if layers and "embeddings" in needs:
        result["embeddings"] = out["hidden_states"][0]
    if layers and "cls_all" in needs:
        result["cls_all"] = [state[:, 0] for state in out["hidden_states"][1:]]
    if want_v:
        result["attention_v"] = capture.take_values(layers)
    if want_qk:
        result["attention_qk"] = capture.take(layers)
    elif want_v:
        capture.take([])  # clear the store
    return result
