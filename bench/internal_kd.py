"""What does internal-representation KD cost over soft-label KD, and what does capturing attention cost?

One frozen teacher (MiniLM-L6-H384 shape by default: 6 layers, hidden 384, 12 heads) and a
3-layer student initialised from teacher layers 2, 4, 6, on one batch (B=32, S=128, a
quarter of it padding). Compared in one process, in alternating rounds:

* ``soft``: dskd's ``train_step`` with 0.5 CE + 0.5 soft-label KD;
* ``cls``: soft + [CLS] cosine on the 3 mapped layers (no attention);
* ``internal``: soft + [CLS] cosine + attention KL on the 3 mapped layers (Q/K captured by hooks),
  through the fused kernels (``dskd/kernels``; on CPU the chunked exact path);
* ``internal_naive``: the same losses through the naive formulas (``kernel: naive``);
* forward only, student: SDPA (``fwd_sdpa``), SDPA with the Q/K hooks storing 3 layers
  (``fwd_sdpa_capture``), and the alternative the hooks avoid: eager attention with
  ``output_attentions=True`` on every layer (``fwd_eager_attentions``).

Memory: the bytes autograd saves for the backward pass during one training step (every
distinct tensor storage packed by ``torch.autograd.graph.saved_tensors_hooks``): the
activation memory a step holds at its peak, counted exactly rather than read from the
process RSS, which CPU allocators make too noisy to compare. Prints one JSON object.

    python bench/internal_kd.py [--rounds 5] [--steps 3] [--batch 32] [--seq 128]
"""

from __future__ import annotations

import argparse
import statistics

from common import add_shape_args, emit, timed  # sets the single-process CPU environment

import torch  # noqa: E402

from dskd import models
from dskd.training import engine as eng  # noqa: E402
from dskd.models.capture import QKCapture  # noqa: E402
from dskd.config import ArchConfig, StudentConfig, TrainingConfig  # noqa: E402
from dskd.losses import LayerGeometry, build_loss_terms  # noqa: E402
from dskd.training.module import DistillationModule, train_step
from dskd.training.stages import Stage, lr_factor
from dskd.teacher.online import TeacherSide  # noqa: E402

SOFT = {"hard_ce": {"weight": 0.5}, "soft_kd": {"weight": 0.5, "temperature": 2.0}}
VARIANTS = {
    "soft": SOFT,
    "cls": {**SOFT, "cls_cosine": {"weight": 1.0}},
    "internal": {**SOFT, "cls_cosine": {"weight": 1.0}, "attention_kl": {"weight": 1.0}},
    # The same losses through the naive formulas (every S x S tensor kept for backward).
    "internal_naive": {name: {**spec, "kernel": "naive"} for name, spec in
                       {**SOFT, "cls_cosine": {"weight": 1.0}, "attention_kl": {"weight": 1.0}}.items()
                       if name != "hard_ce"} | {"hard_ce": SOFT["hard_ce"]},
}


def build(args):
    arch = ArchConfig(layers=args.teacher_layers, hidden=args.hidden, heads=args.heads, intermediate=4 * args.hidden)
    teacher = models.build_from_arch(arch, 30522, 2, 0, seed=0, key="teacher.arch")
    student, init_layers = models.build_student(StudentConfig(layers=args.student_layers), teacher, 2, 0, seed=0)
    teacher = models.freeze(teacher, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    mask[args.batch // 2 :, args.seq // 2 :] = 0  # a quarter of the tokens are padding
    batch = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
             "labels": torch.randint(0, 2, (args.batch,), generator=g)}
    return teacher, student, init_layers, batch


def training_step(variant: str, teacher, student, init_layers, batch):
    losses = VARIANTS[variant]
    pairs = tuple(models.resolve_layer_map(None, init_layers, len(init_layers), teacher.config.num_hidden_layers))
    s_cfg, t_cfg = student.config, teacher.config
    geometry = LayerGeometry(pairs, s_cfg.hidden_size, t_cfg.hidden_size, s_cfg.num_attention_heads,
                             t_cfg.num_attention_heads)
    terms = build_loss_terms(losses, geometry)
    needs = frozenset({"logits"}).union(*(t.needs for t in terms.values()))
    capture = QKCapture(student, [s for s, _ in pairs], "student") if "attention_qk" in needs else None
    side = TeacherSide(teacher, QKCapture(teacher, [t for _, t in pairs], "teacher") if capture else None)
    training = TrainingConfig(batch_size=batch["input_ids"].shape[0], lr=1e-4)
    ds, _ = eng.load_ds_config("ds_configs/zero0_fp32.json", training)
    stages = [Stage("train", 0, 10_000, {})]
    engine = eng.initialize(DistillationModule(student, terms, needs, capture), ds, training,
                            lambda step: lr_factor(step, stages, training))
    engine.train()
    weights = {name: float(spec["weight"]) for name, spec in losses.items()}
    layer_pairs = pairs if "attention_kl" in losses or "cls_cosine" in losses else ()
    return lambda: train_step(engine, side, batch, weights, layer_pairs)[0]


def forward_variants(student, init_layers, batch):
    import copy

    inputs = models.model_inputs(batch)
    sdpa = copy.deepcopy(student).eval()
    eager = copy.deepcopy(student).eval()
    eager.config._attn_implementation = "eager"
    capture = QKCapture(sdpa, list(range(1, len(init_layers) + 1)), "student")

    def plain():
        with torch.no_grad():
            return sdpa(**inputs).logits

    def captured():
        capture.active = set(capture.layers)
        with torch.no_grad():
            out = sdpa(**inputs).logits
        capture.active = set()
        capture.take(capture.layers)
        return out

    def eager_attentions():
        with torch.no_grad():
            return eager(**inputs, output_attentions=True).logits

    return {"fwd_sdpa": plain, "fwd_sdpa_capture": captured, "fwd_eager_attentions": eager_attentions}


def saved_for_backward_mb(step) -> float:
    """MB of distinct tensor storages (parameters excluded) autograd saves for backward while ``step`` runs."""
    storages: dict[int, int] = {}

    def pack(tensor):
        if not (tensor.is_leaf and tensor.requires_grad):  # parameters are not activations
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(parser, rounds=5, steps=3, warmup=2, hidden=384, heads=12)
    args = parser.parse_args()

    eng.init_distributed()
    torch.manual_seed(0)
    teacher, student, init_layers, batch = build(args)
    steps = {}
    for variant in VARIANTS:
        _, fresh_student, _, _ = build(args)
        steps[variant] = training_step(variant, teacher, fresh_student, init_layers, batch)
    steps.update(forward_variants(student, init_layers, batch))
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    names = list(steps)
    for i in range(args.rounds):
        for name in names if i % 2 == 0 else reversed(names):  # alternate order against drift
            times[name].append(timed(steps[name], args.steps))
    median = {name: statistics.median(t) for name, t in times.items()}
    memory = {variant: round(saved_for_backward_mb(steps[variant]), 1) for variant in VARIANTS}
    result = {
        "benchmark": "internal_kd",
        "ratio_internal_over_soft": median["internal"] / median["soft"],
        "ratio_cls_over_soft": median["cls"] / median["soft"],
        "ratio_internal_over_cls": median["internal"] / median["cls"],
        "ratio_internal_naive_over_soft": median["internal_naive"] / median["soft"],
        "ratio_internal_fused_over_naive": median["internal"] / median["internal_naive"],
        "ratio_fwd_capture_over_sdpa": median["fwd_sdpa_capture"] / median["fwd_sdpa"],
        "ratio_fwd_eager_attentions_over_sdpa": median["fwd_eager_attentions"] / median["fwd_sdpa"],
        "step_ms_median": {name: round(1000 * t, 2) for name, t in median.items()},
        "saved_for_backward_mb": memory,
    }
    emit(result, args)


if __name__ == "__main__":
    main()
