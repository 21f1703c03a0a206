"""Glitter's candidate pool (part 1 and the reading side of part 2 in ``dskd.methods.glitter``):
``dskd augment`` writes ``n`` candidates per training example; a run reads them by the
original's ``idx``."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dskd.errors import DskdError

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
    from dskd import data
    from dskd.teacher import cache

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

            from dskd.teacher.cache import data_fingerprint

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

    def batch(self, idx: torch.Tensor, tokenizer, device) -> dict:
        """The n candidates of every original, original by original ([B * n] rows), collated."""
        from dskd import data

        flat = self.rows(idx.cpu().numpy()).reshape(-1).tolist()
        columns = self.view[flat]
        rows = [{name: values[i] for name, values in columns.items()} for i in range(len(flat))]
        return {k: v.to(device) for k, v in data.collate(rows, tokenizer).items()}
