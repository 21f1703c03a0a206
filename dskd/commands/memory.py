"""Peak resident memory (RSS) per rank of a distillation, as named lines, for ``dskd plan``.

What each line counts (P: the student's parameters, d: the run dtype's size, W: ranks):

* runtime: the process itself (python, torch, deepspeed, transformers, datasets, the tokenizer,
  gloo) with a model of no size. Measured, not derived.
* teacher weights: P_t x d, frozen, outside the engine: every rank holds a whole copy.
* student weights, gradients, optimizer: from DeepSpeed's own layout (``stage_1_and_2.py``,
  ``stage3.py``, ``bf16_optimizer.py``): ZeRO-1/2/3 keep an fp32 clone of this rank's
  partition of the weights (the "master" copy) even in fp32 training; gradients reach the
  optimizer as an fp32 partition; Adam's two moments are 8 bytes per parameter, partitioned
  from ZeRO-1 on. ZeRO-0 in bf16/fp16 keeps fp32 master weights and gradients whole.
* DeepSpeed buffers: ZeRO-2/3's gradient bucket (``reduce_bucket_size`` elements, allocated
  whole but resident only as far as gradients fill it: min(P, bucket)), ZeRO-3's gathered
  parameters during forward and backward (min(P, ``stage3_max_live_parameters``)) and its
  gradient reduction's scratch (calibrated), ZeRO-0's flattened all-reduce buffer on more
  than one rank.
* activations: the student's forward saves, per token and layer, about 11H + 2I elements plus
  3A x S of attention probabilities and their dropout mask (eager attention; measured with
  torch's saved-tensor hooks on BERT shapes: 9.6k elements per token-layer at H=384, S=64
  against 7.3k + 2.3k here); the teacher's forward (no grad) holds about one layer's working
  set at a time, plus, with layer terms, its hidden states and the mapped layers' Q, K, V kept
  for the loss. Counted at 4 bytes an element in every dtype (measured on CPU, see below).
  Both use the data's longest example (a batch is padded to its longest).
* export (rank 0, after training, with the engine still alive): the consolidated checkpoint
  (ZeRO>0: the ranks' fp32 partitions, merged into an fp32 state dict) and a fresh fp32 model.

The peak is runtime + teacher + student state + the larger of (DeepSpeed buffers +
activations) and the export. Calibration constants are marked; docs/benchmarks.md
("`dskd plan` against the measured peak RSS per rank") has the measured table and commands.
"""

from __future__ import annotations

import torch

MIB = 2**20
# Measured (bench/plan_memory.py, tiny shape, 2 CPU ranks): the peak RSS of a distillation
# of a ~2M-parameter model is ~0.66 GiB; with its model lines taken off, this is what python,
# torch, deepspeed, transformers, datasets, tokenizers and gloo take before any model.
RUNTIME_BYTES = 600 * MIB
# Measured: ZeRO-1/2/3's optimizer code and its first collectives add ~50 MiB over ZeRO-0
# with the same tiny model.
ZERO_RUNTIME_BYTES = 50 * MIB
# Calibrated: ZeRO-3's training step holds more than the gathered parameters and the gradient
# bucket: each gradient exists whole before it is reduced, over gloo the reduce-scatter is an
# all-reduce of the whole bucket plus copies, and its working set grew with the activations.
# Fitted on the four ZeRO-3 rows of docs/benchmarks.md (MiniLM GLUE and corpus, BERT-large at
# two batch sizes): 2 more copies of the weights plus half the activations' bytes.
ZERO3_REDUCE_SCRATCH = 2
ZERO3_ACTIVATION_SHARE = 0.5
# Activations: elements saved per token and layer (besides the attention term), in units of
# (H, I); from torch's saved-tensor hooks on BERT layers (see the module docstring).
SAVED_PER_HIDDEN, SAVED_PER_INTERMEDIATE, SAVED_ATTENTION_COPIES = 11, 2, 3
# Calibrated on CPU: bf16 runs keep about as much activation memory as fp32 ones (upcast
# LayerNorm/softmax saves, fp32 loss path). On GPU, bf16/fp16 activations are about half.
ACTIVATION_ELEMENT_BYTES = 4

# input_ids, attention_mask, token_type_ids as int64, once in the dataset and once in a batch.
TOKEN_BYTES = 3 * 8 * 2
BUFFER_NAMES = {0: "flattened gradient all-reduce", 1: "none", 2: "gradient bucket",
                3: "gathered parameters, gradient bucket and its reduction"}
GPU_NOTE = ("on GPU the model, buffer and activation lines are device memory, where these are not modelled:\n"
            "  the CUDA context (~0.3-0.5 GiB per process), the caching allocator's fragmentation and reserve,\n"
            "  NCCL buffers; check torch.cuda.max_memory_reserved() on a first short run")


def _shape(config) -> dict:
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "heads": config.num_attention_heads,
            # DistilBERT names its feed-forward width hidden_dim
            "intermediate": getattr(config, "intermediate_size", getattr(config, "hidden_dim", 4 * config.hidden_size))}


def train_activation_bytes(shape: dict, batch: int, length: int, dsize: int) -> int:
    """What the student's forward saves for its backward, all layers."""
    per_token_layer = (SAVED_PER_HIDDEN * shape["hidden"] + SAVED_PER_INTERMEDIATE * shape["intermediate"]
                       + SAVED_ATTENTION_COPIES * shape["heads"] * length)
    return int(batch * length * shape["layers"] * per_token_layer * dsize)


def forward_activation_bytes(shape: dict, batch: int, length: int, dsize: int) -> int:
    """A forward without grad: one layer's working set (input, Q, K, V, context, output;
    scores and probabilities; the intermediate and its activation) at a time."""
    per_token = 6 * shape["hidden"] + 2 * shape["intermediate"] + 2 * shape["heads"] * length
    return int(batch * length * per_token * dsize)


def zero_setting(ds_config: dict, key: str, default: int) -> int:
    return int(float(ds_config.get("zero_optimization", {}).get(key, default)))


def student_state_bytes(params: int, dtype: torch.dtype, zero: int, world: int) -> dict[str, int]:
    """Weights, gradients, optimizer (master weights + Adam moments) as DeepSpeed lays them out."""
    dsize = torch.tensor([], dtype=dtype).element_size()
    low = dsize < 4
    shard = world if zero >= 1 else 1
    weights = dsize * params // (world if zero >= 3 else 1)
    master = 4 * params // shard if (low or zero >= 1) else 0
    if zero == 0:
        grads = dsize * params + (4 * params if low else 0)  # bf16/fp16: an fp32 copy the optimizer steps on
    elif zero == 1:
        grads = dsize * params + 4 * params // world  # whole on the model, fp32 partition for the step
    else:
        grads = 4 * params // world
    return {"weights": weights, "gradients": grads, "optimizer": master + 8 * params // shard}


def deepspeed_buffer_bytes(params: int, dtype: torch.dtype, zero: int, world: int, ds_config: dict) -> int:
    dsize = torch.tensor([], dtype=dtype).element_size()
    if zero == 0:
        return dsize * min(params, 500_000_000) if world > 1 else 0  # engine's flattened all-reduce
    bucket = zero_setting(ds_config, "reduce_bucket_size", 500_000_000) \
        if ds_config.get("zero_optimization", {}).get("contiguous_gradients", True) or zero == 3 else 0
    total = dsize * min(params, bucket) if zero >= 2 else 0
    if zero >= 3:
        total += dsize * min(params, zero_setting(ds_config, "stage3_max_live_parameters", 1_000_000_000))
        total += ZERO3_REDUCE_SCRATCH * dsize * min(params, bucket)
    return total


def export_bytes(params: int, dtype: torch.dtype, zero: int) -> int:
    """Rank 0's export after training: the consolidated checkpoint and a new fp32 model."""
    dsize = torch.tensor([], dtype=dtype).element_size()
    if zero >= 1:
        # zero_to_fp32 loads the ranks' optimizer files one by one, dropping the Adam moments of
        # each, and merges the fp32 partitions into a 4P state dict; with the new 4P model that
        # is 8P by the code. Measured 11P (BERT-large shape, ZeRO-2): 12P is used (calibrated).
        return 12 * params
    # The model file, in the run dtype, its fp32 copy (none for fp32: .float() keeps the
    # tensor) and the new fp32 model. Measured 9P against these 8P (ZeRO-0, fp32).
    return dsize * params + (4 * params if dsize < 4 else 0) + 4 * params


def estimate_rss(*, teacher_config, student_config, teacher_params: int, student_params: int, dtype: torch.dtype,
                 zero: int, world: int, ds_config: dict, batch: int, train_length: int, eval_length: int,
                 teacher_online: bool, data_bytes: int, extra_bytes: int = 0, mapped_layers: int = 0) -> dict:
    """The per-rank peak RSS as named lines (bytes) and their sum."""
    dsize = torch.tensor([], dtype=dtype).element_size()
    state = student_state_bytes(student_params, dtype, zero, world)
    s_shape, t_shape = _shape(student_config), _shape(teacher_config)
    eval_batch = 2 * batch  # the loop evaluates teacher and student at twice the training batch
    # Activations at 4 bytes an element whatever the dtype: a bf16 run on CPU measured only 67 MB
    # below what fp32 activations predict and 163 MB above bf16 ones (MiniLM, ZeRO-2; docs/benchmarks.md).
    act_size = ACTIVATION_ELEMENT_BYTES
    student_train = train_activation_bytes(s_shape, batch, train_length, act_size)
    teacher_forward = max(forward_activation_bytes(t_shape, batch, train_length, act_size),
                          forward_activation_bytes(t_shape, eval_batch, eval_length, act_size)) if teacher_online else 0
    export = export_bytes(student_params, dtype, zero)
    if teacher_online and mapped_layers:
        # Layer terms keep the teacher's hidden states (all layers, as HF returns them) and the
        # captured Q, K, V of the mapped layers until the loss is computed.
        per_token = (t_shape["layers"] + 1) * t_shape["hidden"] + 3 * mapped_layers * t_shape["hidden"]
        teacher_forward += batch * train_length * per_token * act_size
    activations = student_train + teacher_forward
    buffers = deepspeed_buffer_bytes(student_params, dtype, zero, world, ds_config)
    if zero >= 3:
        buffers += int(ZERO3_ACTIVATION_SHARE * activations)
    lines = [
        ("runtime (python, torch, deepspeed, transformers, datasets, gloo)",
         RUNTIME_BYTES + (ZERO_RUNTIME_BYTES if zero >= 1 else 0)),
        ("teacher weights (frozen, whole on every rank)" if teacher_online else "teacher weights (cached: none)",
         teacher_params * dsize if teacher_online else 0),
        ("student weights", state["weights"]),
        ("student gradients", state["gradients"]),
        ("optimizer (fp32 master weights + Adam moments)", state["optimizer"]),
        (f"DeepSpeed buffers ({BUFFER_NAMES[min(zero, 3)] if world > 1 or zero else 'none on one rank'})",
         buffers),
        (f"activations (student fwd+bwd, batch {batch} x {train_length} tokens"
         + ("; teacher fwd, no grad)" if teacher_online else ")"), activations),
        ("data (tokenised splits)", data_bytes),
    ]
    if extra_bytes:
        lines.append(("CoDIR memory banks", extra_bytes))
    # The step's buffers and activations are freed (or left to the allocator) before rank 0
    # consolidates the checkpoint, and the export reuses that memory: in the measured runs the
    # export raised rank 0's peak only where it needed more than that working set.
    working = activations + buffers
    fixed = sum(v for name, v in lines) - working
    peak = fixed + max(working, export)
    lines.append(("export on rank 0 (consolidated checkpoint + fp32 model), in place of buffers + activations",
                  export))
    return {"lines": [[name, int(value)] for name, value in lines], "peak_bytes": int(peak),
            "peak_during": "export" if export > working else "training", "gpu_note": GPU_NOTE,
            "train_length": train_length, "eval_length": eval_length}


def format_rss(rss: dict, human) -> list[str]:
    """The estimate's lines for ``dskd plan``'s text output."""
    rows = [(name, value) for name, value in rss["lines"] if not name.startswith("export")]
    export = next(value for name, value in rss["lines"] if name.startswith("export"))
    rows += [("export on rank 0 (at the end, in place of buffers + activations)", export),
             (f"peak (during {rss['peak_during']})", rss["peak_bytes"])]
    width = max(len(name) for name, _ in rows)
    return (["", "peak resident memory (RSS) per rank, estimate (on CPU within 25% of measured runs; "
                 "docs/benchmarks.md):"]
            + [f"  {name:{width}s} {human(value):>9s}" for name, value in rows] + [f"  {rss['gpu_note']}"])
