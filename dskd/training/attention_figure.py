"""Attention maps for TensorBoard: what the attention loss compares, drawn so a person can read it.

For one dev example and one mapped layer pair: a row per compared head (or head group), the
teacher's map on the left and the student's on the right, on one colour scale per row with its
colour bar, titled with the side, the layer and the head, and the example's tokens on the axes.
"""

from __future__ import annotations

import numpy as np
import torch

# Token labels are drawn up to this many tokens; longer examples get numbered ticks.
MAX_LABELLED_TOKENS = 40


def attention_maps(student_qk, teacher_qk, mask: torch.Tensor, groups: tuple[int, int],
                   heads: int) -> tuple[np.ndarray, np.ndarray]:
    """(teacher, student) attention distributions [heads, n, n] of the first example over its
    ``n`` real tokens, with heads averaged in groups as the attention loss compares them."""
    from dskd.losses import attention_log_probs, average_heads

    key_mask = mask.bool()
    n = int(key_mask[0].sum())
    maps = []
    for (q, k), group in ((teacher_qk, groups[1]), (student_qk, groups[0])):
        probs = average_heads(attention_log_probs(q[:1], k[:1], key_mask[:1]), group).exp()[0, :heads, :n, :n]
        maps.append(probs.float().cpu().numpy())
    return maps[0], maps[1]


def head_label(index: int, group: int) -> str:
    """``head 3`` or, when heads are averaged in groups, ``heads 5-8`` (1-based)."""
    if group == 1:
        return f"head {index + 1}"
    return f"heads {index * group + 1}-{(index + 1) * group}"


def attention_figure(teacher: np.ndarray, student: np.ndarray, tokens: list[str], layers: tuple[int, int],
                     groups: tuple[int, int]) -> np.ndarray:
    """An RGB image [H, W, 3] (uint8) of the maps from :func:`attention_maps`. ``layers``:
    (student layer, teacher layer), 1-based; ``groups``: heads averaged per compared head."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, n = teacher.shape[0], teacher.shape[-1]
    cell = 0.16 if n <= MAX_LABELLED_TOKENS else 0.08
    side = max(2.4, min(6.5, 0.9 + cell * n))
    fig = Figure(figsize=(2 * side + 1.2, (side + 0.6) * rows), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2, squeeze=False)
    labels = tokens[:n] if n <= MAX_LABELLED_TOKENS else None
    s_layer, t_layer = layers
    for h in range(rows):
        top = float(max(teacher[h].max(), student[h].max(), 1e-12))
        for col, (name, layer, group, values) in enumerate((("teacher", t_layer, groups[1], teacher[h]),
                                                            ("student", s_layer, groups[0], student[h]))):
            ax = axes[h][col]
            image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=top, interpolation="nearest")
            ax.set_title(f"{name} · layer {layer} · {head_label(h, group)}", fontsize=9)
            if labels is not None:
                ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
                ax.set_yticks(range(n), labels, fontsize=7)
            ax.set_xlabel("key", fontsize=8)
            ax.set_ylabel("query", fontsize=8)
        fig.colorbar(image, ax=list(axes[h]), fraction=0.05, label="attention probability")
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
