"""MATE-KD's adversarial masked-text generator (Rashid et al., ACL 2021), as Combined-KD
(Li et al., Findings of EMNLP 2021) uses it next to Annealing-KD: the term ``mate_kd``.

A small BERT masked-language model (the *generator*) rewrites training sentences:

1. every real token (not special, not padding) is masked with probability ``mask_prob``
   (0.3) and the generator reads the sentence with ``[MASK]`` there;
2. its MLM scores at the masked positions go through a **hard** Gumbel-softmax (``tau`` =
   ``gumbel_temperature``, 1): the forward value is the one-hot of the sampled token, the
   gradient is the soft sample's (straight-through), as the released code's
   ``gumbel_softmax``;
3. that sample times each model's word-embedding matrix is the perturbed input embedding at
   the masked positions; every other position keeps its token's embedding. Student and
   teacher then run on ``inputs_embeds`` (only their logits are read; dskd's Q/K capture
   hooks are inactive outside the main forward and store nothing).

Alternation. Before stage step ``s`` (0-based, counted from the first step of a stage
where the term is on) with ``s % student_steps == 0`` the generator takes
``generator_steps`` AdamW steps (lr ``generator_lr``, no weight decay, gradient norm
clipped to ``generator_clip``) that **maximise** ``MSE(z_s(x'), z_t(x'))``; the student's
optimizer steps are then the trainer's ordinary ones. Generator steps are extra work done
before a student step, so the released code's cycle of 10 generator + 100 student
iterations becomes 100 student steps with 10 generator steps before the first. Which steps
they are is a function of the step counter alone, so a resumed run repeats them.

* Generator step ``k`` before step ``s`` on rank ``r`` reads a batch of training examples
  drawn by a generator seeded with ``(seed, s, k, r)``; its masks and Gumbel noise come from
  another seeded generator. The global RNG (dropout) is never consumed here.
* During a generator step student, teacher and generator run without dropout (eval mode):
  the generator attacks the student's deterministic function (ours; the code leaves the
  student in train mode).
* Gradients reach the generator through ``torch.autograd.grad``, which never accumulates
  into the student's ``.grad`` (where DeepSpeed's gradient hooks live) and never changes
  its weights. Under several ranks the generator gradient is averaged (all-reduce) before
  clipping, so every rank keeps the same generator.

Student steps. For each micro-batch the (then fixed) generator writes ``x'`` from the
batch with fresh masks and noise seeded by ``(seed, step, micro-batch, rank)``. As the
sample is hard, ``x'`` is a token sequence: the student reads it as ``input_ids`` inside the
DeepSpeed forward (so its gradient is DeepSpeed's as usual) and the frozen teacher's logits
on it are computed beforehand under ``no_grad``. The term's value is
``MSE(z_s(x'), phi * z_t(x'))`` with Annealing-KD's factor ``phi = k / max_temperature``
(``max_temperature: 1``: no annealing, MATE-KD's own term).

The generator and its optimizer are deliberately not submodules (DeepSpeed's optimizer
would otherwise own them): their state travels in the term's ``get_extra_state``, i.e. in
every DeepSpeed checkpoint, so resume is exact. They are built under the run's seed, so all
ranks start from the same generator.

ZeRO-3 is refused: the generator step runs the student outside the engine and reads its
full word-embedding matrix, which ZeRO-3 partitions. ``teacher.cache`` is refused (the
teacher must see the generated text). Plateau-ended stages are refused with this term on,
because the held-out plateau loss is computed on dev batches the generator was not given.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dskd.runtime import dist
from dskd.errors import DskdError
from dskd.losses import LossTerm, register_loss

GENERATED = "logits_on_generated_text"  # a need the teacher cache cannot serve (it refuses the term by it)
_GENERATOR, _STUDENT = 0, 1  # which kind of draw a seeded generator is for


def anneal_factor(progress: float, max_temperature: int) -> float:
    """Annealing-KD's ``k / T_max``, k = 1..T_max in equal shares of the stage (as ``annealing_kd``)."""
    k = min(max_temperature, 1 + math.floor(progress * max_temperature))
    return k / max_temperature


def maskable(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids) -> torch.Tensor:
    """Real tokens that may be masked: inside the attention mask and not a special token."""
    special = torch.as_tensor(list(special_ids), dtype=input_ids.dtype, device=input_ids.device)
    return attention_mask.bool() & ~torch.isin(input_ids, special)


def choose_masked(input_ids, attention_mask, special_ids, p: float, rng: torch.Generator) -> torch.Tensor:
    """Each maskable token independently with probability ``p`` (bool [B, S])."""
    draw = torch.rand(input_ids.shape, generator=rng, device=rng.device).to(input_ids.device)
    return maskable(input_ids, attention_mask, special_ids) & (draw < p)


def gumbel_noise(shape, rng: torch.Generator, eps: float = 1e-20) -> torch.Tensor:
    u = torch.rand(shape, generator=rng, device=rng.device)
    return -torch.log(-torch.log(u + eps) + eps)


def gumbel_softmax_hard(scores: torch.Tensor, tau: float, noise: torch.Tensor) -> torch.Tensor:
    """Straight-through Gumbel-softmax over the last dim: forward one-hot of
    ``argmax(log_softmax(scores) + noise)``, gradient of ``softmax((log_softmax(scores) + noise) / tau)``."""
    soft = F.softmax((F.log_softmax(scores.float(), -1) + noise) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return (hard - soft).detach() + soft


def embedding_matrix(model: nn.Module) -> torch.Tensor:
    """The word-embedding matrix [V, d] (KroneckerBERT's factored embedding: its dense product)."""
    emb = model.get_input_embeddings()
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight
    if hasattr(emb, "dense_weight"):
        return emb.dense_weight()
    raise DskdError(f"{type(model).__name__}'s input embedding ({type(emb).__name__}) has no word-embedding "
                    "matrix to multiply the generator's token distributions with")


def perturbed_embeddings(weight: torch.Tensor, input_ids: torch.Tensor, masked: torch.Tensor,
                         sample: torch.Tensor) -> torch.Tensor:
    """Input embeddings [B, S, d]: ``sample @ weight`` at the masked positions (row-major order,
    ``sample`` is [M, V]), the token's own embedding row everywhere else."""
    embeds = F.embedding(input_ids, weight)
    if sample.shape[0] == 0:
        return embeds
    embeds = embeds.clone()
    embeds[masked] = sample.to(weight.dtype) @ weight
    return embeds


def _seed(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**61 - 1)
    return value


@register_loss("mate_kd")
class MateKD(LossTerm):
    """``MSE(z_s(x'), phi * z_t(x'))`` on text ``x'`` rewritten by an adversarial masked-LM
    generator trained to maximise the student-teacher divergence (see module doc)."""

    needs = frozenset({"logits", GENERATED})

    def __init__(self, max_temperature: int = 1, mask_prob: float = 0.3, gumbel_temperature: float = 1.0,
                 generator_steps: int = 10, student_steps: int = 100, generator_lr: float = 5e-7,
                 generator_clip: float = 5.0, generator_layers: int = 4, generator_hidden: int = 256,
                 generator_heads: int = 4, generator_intermediate: int = 1024, generator_init: str | None = None):
        super().__init__()
        if max_temperature < 1:
            raise ValueError("max_temperature must be at least 1 (1: the teacher's logits unscaled)")
        if not 0 < mask_prob <= 1:
            raise ValueError(f"mask_prob (the share of real tokens masked) must be in (0, 1], got {mask_prob}")
        if gumbel_temperature <= 0:
            raise ValueError("gumbel_temperature must be positive")
        if generator_steps < 0 or student_steps < 1:
            raise ValueError("generator_steps must be 0 or more and student_steps at least 1")
        if generator_lr <= 0 or generator_clip <= 0:
            raise ValueError("generator_lr and generator_clip must be positive")
        for name, value in (("generator_layers", generator_layers), ("generator_hidden", generator_hidden),
                            ("generator_heads", generator_heads), ("generator_intermediate", generator_intermediate)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if generator_hidden % generator_heads:
            raise ValueError(f"generator_hidden ({generator_hidden}) must be divisible by generator_heads "
                             f"({generator_heads})")
        if generator_init is not None and not isinstance(generator_init, str):
            raise ValueError(f"generator_init must be a folder (a string) or null, got {generator_init!r}")
        self.max_temperature, self.mask_prob, self.tau = max_temperature, mask_prob, gumbel_temperature
        self.generator_steps, self.student_steps = generator_steps, student_steps
        self.generator_lr, self.generator_clip = generator_lr, generator_clip
        self.shape = (generator_layers, generator_hidden, generator_heads, generator_intermediate)
        self.generator_init = generator_init
        # Plain attributes, not submodules (see the module doc); built by ``build_generator``.
        object.__setattr__(self, "generator", None)
        object.__setattr__(self, "optimizer", None)
        self.mask_id: int | None = None
        self.special_ids: tuple[int, ...] = ()
        self.seed = 0
        self._pending: dict | None = None
        self._logs: dict[str, float] = {}

    # ------------------------------------------------------------ configuration

    def bind_run(self, cfg, key: str) -> None:
        if cfg.teacher.cache is not None:
            raise DskdError(f"`{key}` runs the teacher on the generator's text, which `teacher.cache` cannot serve; "
                            "distil with the online teacher (drop teacher.cache)")
        for i, stage in enumerate(cfg.schedule):
            name = key.split(".", 1)[1]
            on = (stage.losses.get(name, 0) if stage.losses else cfg.losses[name]["weight"]) > 0
            if on and stage.plateau is not None:
                raise DskdError(f"`schedule[{i}].plateau` ({stage.name}) cannot end a stage where `{key}` is on: the "
                                "held-out plateau loss has no generated text for dev batches; drop one of them")
        for other, spec in cfg.losses.items():
            if spec.get("type", other) == "annealing_kd":
                theirs = spec.get("max_temperature", 7)
                if theirs != self.max_temperature:
                    raise DskdError(f"`{key}.max_temperature` is {self.max_temperature} but `losses.{other}."
                                    f"max_temperature` is {theirs}; the generated-text term is annealed like the "
                                    f"original-text one (Combined-KD), so set both to {theirs}")

    def build_generator(self, vocab_size: int, max_position: int, type_vocab_size: int, pad_id: int, mask_id: int,
                        special_ids, seed: int, device, key: str, max_length: int) -> None:
        """The generator (fp32, eval mode) and its AdamW, identical on every rank (built under ``seed``)."""
        from transformers import BertConfig, BertForMaskedLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.generator_init is not None:
                from dskd.config import resolve_path

                folder = Path(resolve_path(self.generator_init))
                if not (folder / "config.json").is_file():
                    raise DskdError(f"`{key}.generator_init` is {folder}, which holds no model (config.json); give "
                                    "a BERT masked-LM folder (the paper's generator is BERT-mini, "
                                    "google/bert_uncased_L-4_H-256_A-4) or null to build one from the generator_* keys")
                try:
                    generator = BertForMaskedLM.from_pretrained(str(folder))
                except Exception as exc:  # transformers raises many types for a bad folder
                    raise DskdError(f"`{key}.generator_init`: could not load a BERT masked LM from {folder}: "
                                    f"{exc}") from None
                if generator.config.vocab_size != vocab_size:
                    raise DskdError(f"`{key}.generator_init` ({folder}) has a vocabulary of "
                                    f"{generator.config.vocab_size} tokens, the teacher {vocab_size}; the generator "
                                    "must write the teacher's tokens")
                if generator.config.max_position_embeddings < max_length:
                    raise DskdError(f"`{key}.generator_init` ({folder}) reads at most "
                                    f"{generator.config.max_position_embeddings} tokens, shorter than "
                                    f"`data.max_length` {max_length}")
            else:
                layers, hidden, heads, intermediate = self.shape
                config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                    num_attention_heads=heads, intermediate_size=intermediate,
                                    max_position_embeddings=max_position, type_vocab_size=type_vocab_size,
                                    pad_token_id=pad_id)
                generator = BertForMaskedLM(config)
        generator.to(device=device, dtype=torch.float32).eval()
        optimizer = torch.optim.AdamW(generator.parameters(), lr=self.generator_lr, weight_decay=0.0)
        object.__setattr__(self, "generator", generator)
        object.__setattr__(self, "optimizer", optimizer)
        self.mask_id, self.special_ids, self.seed = mask_id, tuple(sorted(set(special_ids))), seed

    # ---------------------------------------------------------------- schedule

    def generator_due(self, offset: int) -> bool:
        """Whether generator steps come before stage step ``offset`` (0-based from the stage's start)."""
        return self.generator_steps > 0 and offset % self.student_steps == 0

    def rng(self, device, step: int, index: int, kind: int) -> torch.Generator:
        """The masks' and Gumbel noise's generator for one draw: a function of (seed, step, index, rank)."""
        generator = torch.Generator(device=device)
        generator.manual_seed(_seed(self.seed, step, index, kind, dist.rank()))
        return generator

    # --------------------------------------------------------------- generator

    def sample(self, batch: dict, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked positions [B, S] bool, straight-through one-hot samples [M, V]) for ``batch``;
        differentiable with respect to the generator."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        masked = choose_masked(ids, mask, self.special_ids, self.mask_prob, rng)
        generator_ids = ids.masked_fill(masked, self.mask_id)
        extra = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        hidden = self.generator.bert(input_ids=generator_ids, attention_mask=mask, **extra).last_hidden_state
        scores = self.generator.cls(hidden[masked])  # MLM scores at the masked positions only, [M, V]
        noise = gumbel_noise(scores.shape, rng).to(scores.device)
        return masked, gumbel_softmax_hard(scores, self.tau, noise)

    def divergence(self, student: nn.Module, teacher: nn.Module, batch: dict, rng: torch.Generator) -> torch.Tensor:
        """``MSE(z_s(x'), z_t(x'))`` on the perturbed input embeddings (what the generator maximises)."""
        masked, sample = self.sample(batch, rng)
        extra = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        logits = []
        for model in (student, teacher):
            embeds = perturbed_embeddings(embedding_matrix(model), batch["input_ids"], masked, sample)
            logits.append(model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], **extra)["logits"])
        return F.mse_loss(logits[0].float(), logits[1].float())

    def generator_update(self, student: nn.Module, teacher: nn.Module, batch: dict,
                         rng: torch.Generator) -> torch.Tensor:
        """One AdamW step of the generator up the divergence; returns the divergence before it.
        Touches neither the student's weights nor its ``.grad``."""
        params = list(self.generator.parameters())
        value = self.divergence(student, teacher, batch, rng)
        grads = torch.autograd.grad(-value, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        if dist.world_size() > 1:
            flat = torch.cat([g.reshape(-1) for g in grads]).to(dist.device())
            torch.distributed.all_reduce(flat)
            flat = flat.to(params[0].device) / dist.world_size()
            grads = torch.split(flat, [g.numel() for g in grads])
        for p, g in zip(params, grads, strict=True):
            p.grad = g.reshape(p.shape).detach().clone()
        nn.utils.clip_grad_norm_(params, self.generator_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value.detach()

    def generator_cycle(self, student: nn.Module, teacher: nn.Module, batches, step: int) -> list[float]:
        """The generator steps before stage step ``step``: ``batches(k)`` gives step k's batch.
        Student and teacher run in eval mode (no dropout); their modes are restored after."""
        was_training = student.training
        student.eval()
        values = []
        try:
            for k in range(self.generator_steps):
                batch = batches(k)
                rng = self.rng(batch["input_ids"].device, step, k, _GENERATOR)
                values.append(float(self.generator_update(student, teacher, batch, rng)))
        finally:
            student.train(was_training)
        self.check_same_on_every_rank()
        self._logs = {"generator_mse_first": values[0], "generator_mse_last": values[-1]}
        return values

    def check_same_on_every_rank(self) -> None:
        """Under several ranks, a guard (one tiny all-reduce per cycle): every rank's generator
        must have the same weights, which the averaged gradients guarantee."""
        if dist.world_size() == 1:
            return
        total = torch.stack([p.detach().double().sum() for p in self.generator.parameters()]).sum()
        both = torch.stack([total, -total]).to(dist.device())
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
        if both[0].item() != total.item() or -both[1].item() != total.item():
            raise RuntimeError("`mate_kd`: the generators of the ranks differ after a generator cycle")

    @torch.no_grad()
    def generate(self, batch: dict, rng: torch.Generator) -> dict:
        """``batch``'s model inputs with the masked tokens replaced by the generator's samples."""
        masked, sample = self.sample(batch, rng)
        ids = batch["input_ids"].clone()
        ids[masked] = sample.argmax(-1).to(ids.dtype)
        inputs = {"input_ids": ids, "attention_mask": batch["attention_mask"]}
        if "token_type_ids" in batch:
            inputs["token_type_ids"] = batch["token_type_ids"]
        return inputs

    # ---------------------------------------------------------------- the loss

    def factor(self) -> float:
        return anneal_factor(self.progress, self.max_temperature)

    def prepare(self, student: nn.Module, teacher, batch: dict, step: int, micro: int) -> None:
        """Before a training micro-step: write ``x'`` and the teacher's logits on it, for ``forward``."""
        inputs = self.generate(batch, self.rng(batch["input_ids"].device, step, micro, _STUDENT))
        with torch.no_grad():
            teacher_logits = teacher.outputs(inputs, frozenset({"logits"}), (), "train")["logits"]
        self._pending = {"mask": batch["attention_mask"], "inputs": inputs, "teacher_logits": teacher_logits,
                         "model": student}

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:
        pending, self._pending = self._pending, None
        if pending is None or pending["mask"].shape != mask.shape or not torch.equal(pending["mask"], mask):
            raise RuntimeError("`mate_kd` was called without generated text for this batch; the trainer prepares it "
                               "(`before_micro_step`) before every training micro-step")
        zs = pending["model"](**pending["inputs"])["logits"]
        return F.mse_loss(zs.float(), self.factor() * pending["teacher_logits"].float())

    def extra_logs(self) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v) for k, v in self._logs.items()}

    # ------------------------------------------------------------ trainer hooks

    def bind_job(self, job, key: str) -> None:
        """Refuse what the generator cannot run under, then build it for the teacher's vocabulary."""
        if job.zero_stage == 3:
            raise DskdError(f"`{key}`: the generator's steps run the student outside the DeepSpeed engine with its "
                            f"full word-embedding matrix, which ZeRO-3 partitions ({job.ds_file}); use ZeRO stage "
                            "0, 1 or 2")
        teacher = getattr(job.teacher, "model", None)
        if teacher is None:
            raise DskdError(f"`{key}` needs the online teacher to score the generated text")
        tokenizer = job.tokenizer
        if tokenizer.mask_token_id is None:
            raise DskdError(f"`{key}`: the tokenizer has no mask token for the generator's input")
        try:
            w_t, w_s = embedding_matrix(teacher), embedding_matrix(job.model)
        except DskdError as exc:
            raise DskdError(f"`{key}`: {exc}") from None
        if w_t.shape[0] != w_s.shape[0]:
            raise DskdError(f"`{key}`: the teacher embeds {w_t.shape[0]} tokens and the student {w_s.shape[0]}; the "
                            "generator writes one vocabulary for both")
        config = teacher.config
        self.build_generator(w_t.shape[0], int(getattr(config, "max_position_embeddings", 512)),
                             int(getattr(config, "type_vocab_size", 2) or 2), tokenizer.pad_token_id,
                             tokenizer.mask_token_id, tokenizer.all_special_ids, job.cfg.seed + 3, dist.device(), key,
                             job.cfg.data.max_length)

    def before_micro_step(self, step, batch: dict) -> dict:
        """At a cycle boundary (first micro-step of the optimizer step) the generator steps; then
        the micro-batch's generated text and the teacher's logits on it."""
        model, device = step.engine.module.model, batch["input_ids"].device
        if step.micro == 0 and self.generator_due(step.step - step.stage.start):
            self.generator_cycle(model, step.job.teacher.model,
                                 lambda k: training_batch(step.job, step.step, k, device), step.step)
        self.prepare(model, step.job.teacher, batch, step.step, step.micro)
        return batch

    # ------------------------------------------------------------ checkpointing

    def get_extra_state(self) -> dict:
        if self.generator is None:
            return {}
        return {"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict(),
                "logs": dict(self._logs)}

    def set_extra_state(self, state: dict) -> None:
        if not state:
            return
        if self.generator is None:
            raise RuntimeError("`mate_kd`: a checkpoint holds a generator but none was built; call build_generator "
                               "(the trainer does, through `bind_job`) before loading")
        self.generator.load_state_dict(state["generator"])
        # A copy: torch keeps the given moment tensors when device and dtype already match, and
        # they must not stay shared with whatever handed us the state.
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self._logs = dict(state.get("logs", {}))


# ------------------------------------------------------------------ trainer hooks


def training_batch(job, step: int, k: int, device) -> dict:
    """Generator step ``k`` before optimizer step ``step`` on this rank: a batch of training
    examples drawn from (seed, step, k, rank) only."""
    from dskd import data

    generator = torch.Generator().manual_seed(_seed(job.cfg.seed, step, k, dist.rank(), 7))
    rows = torch.randperm(len(job.train_set), generator=generator)[: job.training.batch_size].tolist()
    return {key: v.to(device) for key, v in data.collate([job.train_set[i] for i in rows], job.tokenizer).items()}
