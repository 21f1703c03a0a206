"""Glitter (Kamalloo, Rezagholizadeh, Ghodsi; Findings of ACL 2022): distil on the augmented
candidates where the student is furthest from the teacher.

Spec and provenance: ../shared/reference/methods.md §4.6; our choices are listed in
docs/methods.md ("Glitter"). Three parts:

1. **Candidate pool, offline** (``dskd augment``): ``n`` candidates per training example, a
   ``datasets`` split saved with ``save_to_disk`` in ``<pool>/candidates/`` plus
   ``<pool>/manifest.json`` (generation settings, the training data it was made from, its own
   content hash). Each row: ``cid`` (the stable candidate id ``idx * n + candidate``),
   ``idx`` (the original's), ``candidate`` (0..n-1), ``op`` (how it was made), the text(s)
   and the original's label. A candidate is a pure function of (seed, idx, candidate), so the
   pool does not depend on the order of the data. Generation: masked-LM fill-in with the
   teacher's own MLM head where its folder has one, otherwise EDA-style operations without
   synonyms (random deletion, random swap, random insertion of a word of the same sentence).
2. **Teacher logits of every candidate** (``dskd cache-teacher`` with ``data.augment``): the
   cache's split ``augment`` keyed by candidate id; the pool's size and hash are part of the
   cache identity (``data.augment``), so a cache of another pool is refused.
3. **Per step** (the ``glitter`` term): the trainer adds the candidates of the batch's
   originals to the batch (``batch["augment"]``, ``attach``); ``DistillationModule.forward``
   runs the student on them (train mode, with grad, inside the DeepSpeed module so ZeRO-3
   gathers the parameters); the teacher side reads their logits (cache split ``augment``, or
   the online teacher). Per original, the ``select`` candidates with the largest
   ``KL(softmax_T(z_t) || softmax_T(z_s))`` (squared error for regression) are kept, and the
   term is ``T^2 * KL`` averaged over the kept ones (``batchmean``). The original-example
   parts of Glitter's loss are the existing ``soft_kd`` and ``hard_ce`` terms.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dskd.errors import DskdError
from dskd.kernels import soft_kl_rows
from dskd.losses import LossTerm, register_loss

POOL_FORMAT = "dskd-augment-pool"
POOL_VERSION = 1
MANIFEST = "manifest.json"
CANDIDATES_DIR = "candidates"
SPLIT = "augment"  # the teacher cache's split of candidate logits, keyed by candidate id
EDA_OPS = ("delete", "swap", "insert")
METHODS = ("auto", "eda", "mlm")
TEXT_COLUMNS = ("text_a", "text_b")


def candidate_id(idx, candidate, n: int):
    """The stable id of candidate ``candidate`` (0-based) of training example ``idx``: ``idx * n + candidate``."""
    return idx * n + candidate


# ------------------------------------------------------------------------ EDA


def random_deletion(words: list[str], rng: np.random.Generator, p: float) -> list[str]:
    """Each word dropped with probability ``p``; at least one dropped and one kept (2+ words)."""
    if len(words) < 2:
        return list(words)
    keep = rng.random(len(words)) >= p
    if keep.all():
        keep[rng.integers(len(words))] = False
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return [w for w, k in zip(words, keep) if k]


def random_swap(words: list[str], rng: np.random.Generator, count: int) -> list[str]:
    """``count`` times, swap the words at two different random positions."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(count):
        i, j = rng.choice(len(out), size=2, replace=False)
        out[i], out[j] = out[j], out[i]
    return out


def random_insertion(words: list[str], rng: np.random.Generator, count: int) -> list[str]:
    """``count`` times, insert a random word of the original sentence at a random position
    (EDA inserts a synonym; we have no thesaurus, so the word itself)."""
    out = list(words)
    if not words:
        return out
    for _ in range(count):
        word = words[rng.integers(len(words))]
        out.insert(int(rng.integers(len(out) + 1)), word)
    return out


def eda(text: str, op: str, rng: np.random.Generator, alpha: float) -> str:
    """One EDA variant of ``text`` (whitespace words): ``delete`` (probability ``alpha`` per
    word), ``swap`` / ``insert`` (``max(1, round(alpha * words))`` times)."""
    words = text.split()
    count = max(1, round(alpha * len(words)))
    if op == "delete":
        words = random_deletion(words, rng, alpha)
    elif op == "swap":
        words = random_swap(words, rng, count)
    elif op == "insert":
        words = random_insertion(words, rng, count)
    else:
        raise ValueError(f"unknown EDA operation {op!r}; use {', '.join(EDA_OPS)}")
    return " ".join(words)


def eda_candidates(texts: dict[str, str], idx: int, n: int, seed: int, ops: tuple[str, ...], alpha: float):
    """The ``n`` EDA candidates of one example: candidate j uses operation ``ops[j % len(ops)]``
    (so every operation is used equally, as EDA does) on every text column, each with its own
    random stream seeded by (seed, idx, j, column): independent of any other example."""
    out = []
    for j in range(n):
        op = ops[j % len(ops)]
        variant = {column: eda(text, op, np.random.default_rng([seed, idx, j, c]), alpha)
                   for c, (column, text) in enumerate(texts.items())}
        out.append((op, variant))
    return out


# ------------------------------------------------------------ masked-LM fill-in


def load_mlm(path: str | None, key: str = "teacher.path"):
    """(model, tokenizer) when ``path`` holds masked-LM head weights, else (None, why)."""
    if path is None:
        return None, "the teacher is built from `teacher.arch` (no pretrained masked-LM head)"
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from dskd.models import resolve_model_path

    source = resolve_model_path(path)
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(source, output_loading_info=True)
    except Exception as exc:  # an architecture without a masked-LM class, a broken folder, ...
        return None, f"{source} cannot be loaded as a masked LM ({type(exc).__name__}: {str(exc)[:200]})"
    prefix = getattr(model, "base_model_prefix", "")
    head = [k for k in info.get("missing_keys", []) if not k.startswith(prefix + ".")]
    if head:
        return None, f"{source} has no masked-LM head weights (missing {', '.join(sorted(head)[:3])})"
    return (model.eval(), AutoTokenizer.from_pretrained(source)), None


def mlm_candidates(model, tokenizer, texts: dict[str, str], idx: int, n: int, seed: int, mask_rate: float,
                   top_k: int):
    """The ``n`` masked-LM candidates of one example: per candidate and text column,
    ``max(1, round(mask_rate * tokens))`` word pieces are masked and each is replaced by a draw
    from the model's top ``top_k`` predictions; the n candidates of a column are one batch of
    this example alone, so nothing depends on other examples."""
    mask_id = tokenizer.mask_token_id
    limit = min(512, getattr(model.config, "max_position_embeddings", 512))
    out = [("mlm", {}) for _ in range(n)]
    for c, (column, text) in enumerate(texts.items()):
        rng = np.random.default_rng([seed, idx, c])
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        ids = tokenizer(text, truncation=True, max_length=limit, return_tensors="pt")["input_ids"][0]
        special = tokenizer.get_special_tokens_mask(ids.tolist(), already_has_special_tokens=True)
        positions = np.array([i for i, s in enumerate(special) if not s])
        if len(positions) == 0:
            for j in range(n):
                out[j][1][column] = text
            continue
        count = max(1, round(mask_rate * len(positions)))
        batch = ids.repeat(n, 1)
        picks = [np.sort(rng.choice(positions, size=count, replace=False)) for _ in range(n)]
        for j, pick in enumerate(picks):
            batch[j, pick] = mask_id
        with torch.no_grad():
            logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits.float()
        for j, pick in enumerate(picks):
            values, tokens = logits[j, pick].topk(min(top_k, logits.shape[-1]), dim=-1)
            drawn = torch.multinomial(torch.softmax(values, -1), 1, generator=generator).squeeze(1)
            batch[j, pick] = tokens.gather(1, drawn[:, None]).squeeze(1)
            out[j][1][column] = tokenizer.decode(batch[j], skip_special_tokens=True,
                                                 clean_up_tokenization_spaces=True)
    return out


# ---------------------------------------------------------------- the pool


def build_pool(raw, n: int, generate):
    """The candidate rows of every example of ``raw`` (columns text_a[, text_b], label, idx),
    sorted by candidate id. ``generate(texts, idx)`` returns the example's n (op, texts)."""
    import datasets

    columns = [c for c in TEXT_COLUMNS if c in raw.column_names]
    rows = []
    for example in raw:
        idx = int(example["idx"])
        texts = {c: example[c] for c in columns}
        made = generate(texts, idx)
        if len(made) != n:
            raise RuntimeError(f"generated {len(made)} candidates for idx {idx}, expected {n}")
        for j, (op, variant) in enumerate(made):
            rows.append({"cid": candidate_id(idx, j, n), "idx": idx, "candidate": j, "op": op,
                         **{c: variant[c] for c in columns}, "label": example["label"]})
    rows.sort(key=lambda r: r["cid"])
    features = datasets.Features({
        "cid": datasets.Value("int64"), "idx": datasets.Value("int64"), "candidate": datasets.Value("int64"),
        "op": datasets.Value("string"), **{c: datasets.Value("string") for c in columns},
        "label": raw.features["label"],
    })
    return datasets.Dataset.from_list(rows, features=features)


def augment(cfg, out: Path, candidates: int = 8, seed: int = 0, method: str = "auto", alpha: float = 0.1,
            ops: list[str] | None = None, mask_rate: float = 0.15, top_k: int = 10, overwrite: bool = False,
            argv: list[str] | None = None, log=None) -> dict:
    """``dskd augment``: write the candidate pool of the config's training split to ``out``.
    One process (generation is cheap next to training; run it without a launcher)."""
    from dskd import cache, data

    log = log or (lambda *parts: print(*parts, file=sys.stderr, flush=True))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DskdError("`dskd augment` runs in one process; run it without a launcher")
    if candidates < 1:
        raise DskdError(f"--candidates must be at least 1, got {candidates}")
    if seed < 0:
        raise DskdError(f"--seed must be non-negative, got {seed}")
    if method not in METHODS:
        raise DskdError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    ops = tuple(ops or EDA_OPS)
    unknown = [op for op in ops if op not in EDA_OPS]
    if unknown:
        raise DskdError(f"--ops: unknown EDA operation(s) {', '.join(unknown)}; use {', '.join(EDA_OPS)}")
    if not 0 < alpha < 1:
        raise DskdError(f"--alpha (the share of words an EDA operation changes) must be in (0, 1), got {alpha}")
    if not 0 < mask_rate < 1 or top_k < 1:
        raise DskdError(f"--mask-rate must be in (0, 1) and --top-k at least 1, got {mask_rate}, {top_k}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / MANIFEST).is_file() and not (out / CANDIDATES_DIR).is_dir():
            raise DskdError(f"--output {out} exists and holds no candidate pool; choose another folder")
        if not overwrite:
            raise DskdError(f"--output {out} already holds a candidate pool; pass --overwrite to replace it")

    task = data.get_task(cfg.data.task)
    raw = data.load_split(task, cfg.data.path, "train", cfg.data.train_limit)
    source = {"examples": len(raw), "hash": cache.data_fingerprint(raw)}
    used, note, mlm_settings = method, None, None
    if method in ("auto", "mlm"):
        found, why = load_mlm(cfg.teacher.path)
        if found is None:
            if method == "mlm":
                raise DskdError(f"--method mlm fills in masks with the teacher's masked-LM head, but {why}; use "
                                "--method eda (or auto, which falls back to it)")
            used, note = "eda", f"no masked-LM head: {why}; EDA operations instead"
            log(f"[augment] {note}")
        else:
            used = "mlm"
            mlm_model, mlm_tokenizer = found
            mlm_settings = {"model": cfg.teacher.path, "weights": cache.teacher_fingerprint(cfg.teacher, cfg.seed),
                            "mask_rate": mask_rate, "top_k": top_k}
    if used == "mlm":
        def generate(texts, idx):
            return mlm_candidates(mlm_model, mlm_tokenizer, texts, idx, candidates, seed, mask_rate, top_k)
    else:
        def generate(texts, idx):
            return eda_candidates(texts, idx, candidates, seed, ops, alpha)

    started = time.perf_counter()
    pool = build_pool(raw, candidates, generate)
    manifest = {
        "format": POOL_FORMAT, "version": POOL_VERSION, "task": task.name, "candidates": candidates, "seed": seed,
        "method": used, "requested_method": method, "note": note,
        "eda": {"ops": list(ops), "alpha": alpha} if used == "eda" else None, "mlm": mlm_settings,
        "source": source, "rows": len(pool), "fingerprint": cache.data_fingerprint(pool),
        "candidate_id": "idx * candidates + candidate",
        "data": {"path": cfg.data.path, "train_limit": cfg.data.train_limit},
        "command": list(argv or []), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    save_pool(out, pool, manifest)
    log(f"[augment] {len(raw)} examples x {candidates} candidates ({used}) in {time.perf_counter() - started:.1f} s")
    return manifest


def save_pool(out: Path, pool, manifest: dict) -> None:
    """Write ``pool`` and its manifest to ``out`` through a ``.partial`` folder renamed at the end."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    pool.save_to_disk(str(partial / CANDIDATES_DIR))
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: its presence means complete
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)


class CandidatePool:
    """A pool written by ``dskd augment``, opened for reading (``key`` names it in errors)."""

    def __init__(self, path: str | Path, key: str = "data.augment"):
        self.path, self.key = Path(path), key
        hint = "write one with `dskd augment --config C --output DIR`"
        if not self.path.is_dir():
            raise DskdError(f"`{key}`: {self.path} does not exist; {hint}")
        if not (self.path / MANIFEST).is_file() or not (self.path / CANDIDATES_DIR).is_dir():
            raise DskdError(f"`{key}`: {self.path} is not a candidate pool (no {MANIFEST} and {CANDIDATES_DIR}/); "
                            f"{hint}")
        try:
            self.manifest = json.loads((self.path / MANIFEST).read_text())
        except json.JSONDecodeError as exc:
            raise DskdError(f"`{key}`: {self.path / MANIFEST} is corrupt ({exc}); rewrite the pool") from None
        if self.manifest.get("format") != POOL_FORMAT or self.manifest.get("version") != POOL_VERSION:
            raise DskdError(f"`{key}`: {self.path} holds {self.manifest.get('format')!r} version "
                            f"{self.manifest.get('version')!r}, not {POOL_FORMAT!r} version {POOL_VERSION}; {hint}")
        self.n = int(self.manifest["candidates"])
        self._dataset = None

    @property
    def fingerprint(self) -> dict:
        """What the teacher cache records of the pool (``identity.data.augment``)."""
        return {"examples": self.manifest["rows"], "hash": self.manifest["fingerprint"]}

    def dataset(self):
        """The candidate rows, checked against the manifest's content hash."""
        if self._dataset is None:
            import datasets

            from dskd.cache import data_fingerprint

            ds = datasets.load_from_disk(str(self.path / CANDIDATES_DIR))
            if len(ds) != self.manifest["rows"] or data_fingerprint(ds) != self.manifest["fingerprint"]:
                raise DskdError(f"`{self.key}`: {self.path / CANDIDATES_DIR} differs from what its manifest "
                                "records (rows or content hash); it was altered: rewrite it with `dskd augment`")
            self._dataset = ds
        return self._dataset

    def check_source(self, task: str, train: dict) -> None:
        """Refuse a pool made from another task or other training data (``train``: the run's raw
        training split's size and content hash, before holdout and label noise)."""
        diffs = []
        if self.manifest["task"] != task:
            diffs.append(f"task: pool {self.manifest['task']}, run {task}")
        for name in ("examples", "hash"):
            if self.manifest["source"].get(name) != train.get(name):
                diffs.append(f"train {name}: pool {self.manifest['source'].get(name)!r}, run {train.get(name)!r}")
        if diffs:
            raise DskdError(f"`{self.key}`: {self.path} was generated from other training data ({'; '.join(diffs)}); "
                            "write a pool for this config with `dskd augment`")


class Candidates:
    """A pool tokenised for a run: the collated candidates of a batch's originals."""

    def __init__(self, pool: CandidatePool, tokenizer, max_length: int):
        from dskd import data

        self.pool, self.n = pool, pool.n
        ds = pool.dataset()
        keep = [c for c in TEXT_COLUMNS if c in ds.column_names] + ["label", "cid"]
        view = ds.select_columns(keep).rename_column("cid", "idx")  # the cache's key is the candidate id
        self.view = data.tokenize_split(view, tokenizer, max_length, in_memory=True)
        cids = np.asarray(self.view.data.column("idx").to_numpy(), dtype=np.int64)
        self.where = np.full(int(cids.max()) + 1 if len(cids) else 0, -1, dtype=np.int64)
        self.where[cids] = np.arange(len(cids))

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Pool rows [B, n] of the candidates of the originals ``idx`` [B]."""
        cids = candidate_id(np.asarray(idx, dtype=np.int64)[:, None], np.arange(self.n)[None, :], self.n)
        known = cids < len(self.where)
        rows = np.where(known, self.where[np.clip(cids, 0, max(len(self.where) - 1, 0))], -1)
        if (rows < 0).any():
            missing = sorted({int(i) for i in np.asarray(idx)[(rows < 0).any(1)]})[:5]
            raise DskdError(f"`{self.pool.key}`: {self.pool.path} has no candidates for training example(s) idx "
                            f"{missing}; write a pool for this config with `dskd augment`")
        return rows

    def batch(self, idx: torch.Tensor, pad_id: int, device) -> dict:
        """The n candidates of every original, original by original ([B * n] rows), collated."""
        from dskd import data

        flat = self.rows(idx.cpu().numpy()).reshape(-1).tolist()
        columns = self.view[flat]
        rows = [{name: values[i] for name, values in columns.items()} for i in range(len(flat))]
        return {k: v.to(device) for k, v in data.collate(rows, pad_id).items()}


def open_candidates(cfg, task, tokenizer, fingerprints: dict) -> Candidates | None:
    """The run's candidates (None without ``data.augment``), checked against the training data
    (``fingerprints["train"]``); records the pool in ``fingerprints[SPLIT]`` for the cache identity."""
    if cfg.data.augment is None:
        return None
    from dskd.config import resolve_path

    pool = CandidatePool(resolve_path(cfg.data.augment))
    pool.check_source(task.name, fingerprints["train"])
    fingerprints[SPLIT] = pool.fingerprint
    return Candidates(pool, tokenizer, cfg.data.max_length)


def reads_candidates(terms, names) -> bool:
    return any(getattr(terms[name], "augments", False) for name in names)


def attach(candidates: Candidates | None, batch: dict, pad_id: int) -> dict:
    """``batch`` plus ``batch["augment"]``, its originals' candidates."""
    if candidates is None or "augment" in batch:
        return batch
    return dict(batch, augment=candidates.batch(batch["idx"], pad_id, batch["input_ids"].device))


# ------------------------------------------------------------------- the term


def select_top(distances: torch.Tensor, k: int) -> torch.Tensor:
    """Per original (row of ``distances`` [B, n]), the indices of its ``k`` largest distances."""
    return torch.topk(distances, min(k, distances.shape[1]), dim=1).indices


@register_loss("glitter")
class Glitter(LossTerm):
    """Glitter's augmented part: ``T^2 * KL(softmax_T(z_t) || softmax_T(z_s))`` averaged over the
    ``select`` candidates per original that are furthest from the teacher (module docstring).
    Regression: the squared error of the selected candidates. No candidates in the batch
    (evaluation, the dev batches of a plateau check): 0."""

    augments = True  # reads batch["augment"]: the trainer attaches it, the module runs the student on it

    def __init__(self, temperature: float = 5.0, select: int = 2):
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        if select < 1:
            raise ValueError("select (the candidates kept per original, Glitter's k) must be at least 1")
        self.temperature, self.select = temperature, select
        self._logs: dict[str, torch.Tensor] = {}
        self.last_selected: torch.Tensor | None = None

    def bind_run(self, cfg, key: str) -> None:
        if cfg.data.augment is None:
            raise DskdError(f"`{key}` distils on augmented candidates; set `data.augment` to a pool written by "
                            "`dskd augment`")
        from dskd.config import resolve_path

        n = CandidatePool(resolve_path(cfg.data.augment)).n
        if self.select > n:
            raise DskdError(f"`{key}.select` is {self.select}, but the pool `data.augment` has {n} candidates per "
                            "example")

    def before_micro_step(self, step, batch: dict) -> dict:
        """The batch's originals' candidates go with it (the student runs on them in the module's forward)."""
        return attach(step.job.candidates, batch, step.pad_id)

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:
        if "augment" not in student:
            self._logs = {}
            return student["logits"].new_zeros((), dtype=torch.float32)
        zs, zt = student["augment"]["logits"], teacher["augment"]["logits"]
        b = student["logits"].shape[0]
        n, c = zs.shape[0] // b, zs.shape[-1]
        if c == 1:
            rows = (zs.float() - zt.float()).pow(2).reshape(b, n)
            scale = 1.0
        else:
            t = self.temperature
            rows = soft_kl_rows(zs.reshape(-1, c), zt.reshape(-1, c), t).reshape(b, n)
            scale = t * t
        chosen = select_top(rows.detach(), self.select)
        picked = rows.gather(1, chosen)
        self.last_selected = chosen
        self._logs = {"selected": picked.detach().mean(), "candidates": rows.detach().mean()}
        return picked.sum() / picked.numel() * scale

    def extra_logs(self) -> dict[str, torch.Tensor]:
        return dict(self._logs)


def reference_loss(zs: torch.Tensor, zt: torch.Tensor, b: int, temperature: float, select: int) -> torch.Tensor:
    """The term written out with ``F.kl_div`` (tests): zs, zt [b * n, C]."""
    n = zs.shape[0] // b
    if zs.shape[-1] == 1:
        d = F.mse_loss(zs.float(), zt.float(), reduction="none").reshape(b, n)
        return d.gather(1, d.detach().topk(select, 1).indices).mean()
    t = temperature
    d = F.kl_div(F.log_softmax(zs / t, -1), F.softmax(zt / t, -1), reduction="none").sum(-1).reshape(b, n)
    return d.gather(1, d.detach().topk(select, 1).indices).mean() * t * t
