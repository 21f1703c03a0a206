"""The teacher cache: run the frozen teacher once, read its outputs by example index.

``dskd cache-teacher`` writes, for every configured split, exactly what the run's loss
terms take from the teacher: the logits, and for the mapped teacher layers the [CLS]
vectors (``cls``) and the attention queries and keys (``attention_qk``). ``dskd distill``
with ``teacher.cache`` then reads them instead of loading and running the teacher.

Layout (``FORMAT_VERSION`` 1)::

    CACHE/
      pending.json              what is being written (identity + layout), written first
      manifest.json             written last, once every shard is complete: its presence
                                means "complete"; it carries every file's size and CRC32
      tokenizer/                the tokenizer the data was encoded with
      teacher_config.json       the teacher's Hugging Face config (geometry for the losses)
      <split>/shard-<r>/        one folder per writing rank
        index.npy lengths.npy offsets.npy   example idx, token count, first token row
        logits.npy              [examples, labels] float32
        cls_L<t>.npy            [examples, hidden]           (storage dtype)
        qk_L<t>.npy             [tokens, 2, hidden]          (storage dtype; Q then K)
        progress.json           batches written so far (resume point)
        done.json               the shard's file sizes and checksums

Attention is stored as the mapped layers' Q and K for the example's real tokens only
(ragged: no padding is stored), not as S x S probability maps: per token and layer that
is ``2 * hidden`` values against ``L * heads`` for a map row, so Q/K is smaller once
sequences are longer than ``2 * head_dim`` (128 tokens for BERT), it grows linearly
with length rather than quadratically, it keeps the distribution exact (the loss
recomputes the softmax in fp32, where a stored fp16 map loses small probabilities), and
it is what the fused Q/K attention loss consumes. docs/benchmarks.md has the sizes.

bf16 has no numpy dtype: it is stored as its raw 16-bit pattern (``uint16``) and viewed
back as ``torch.bfloat16``. Logits are kept in float32 whatever the storage dtype: they
are tiny and soft-label KD divides them by a temperature.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dskd.errors import DskdError

FORMAT = "dskd-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PENDING = "pending.json"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", **{k: k for k in STORAGE_DTYPES}}
CACHEABLE = ("logits", "cls", "mean", "attention_qk")  # what a loss term may need from the teacher
POOLED = ("cls", "mean")  # per-layer [examples, hidden] fields
AUGMENT = "augment"  # Glitter's candidates (`data.augment`): logits only, keyed by candidate id
_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
_CHUNK = 8 << 20


def storage_dtype(name: str, key: str = "--dtype") -> str:
    try:
        return DTYPE_ALIASES[name]
    except KeyError:
        raise DskdError(f"{key}: unknown cache dtype {name!r}; use fp32, fp16 or bf16") from None


def element_size(dtype: str) -> int:
    return torch.tensor([], dtype=STORAGE_DTYPES[dtype]).element_size()


# ------------------------------------------------------------------- fingerprints


def _sha(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:16]


def _file_sha(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:16]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")


def teacher_fingerprint(teacher_cfg, seed: int) -> str:
    """A hash of the teacher's weights (its folder's weight files and config.json), or of
    the recipe of a teacher built from ``teacher.arch`` (shape + seed, which fix its
    deterministic initialisation)."""
    import dataclasses

    from dskd.models import resolve_model_path

    if teacher_cfg.path is None:
        recipe = json.dumps({"arch": dataclasses.asdict(teacher_cfg.arch), "seed": seed}, sort_keys=True)
        return _sha(recipe.encode())
    source = Path(resolve_model_path(teacher_cfg.path))
    files = sorted(p for p in source.iterdir() if p.suffix in WEIGHT_SUFFIXES) if source.is_dir() else []
    if not files:
        raise DskdError(f"`teacher.path` ({source}): no weight files (*.safetensors, *.bin) to fingerprint")
    config = source / "config.json"
    return _file_sha(files + ([config] if config.is_file() else []))


def tokenizer_fingerprint(tokenizer) -> str:
    """Everything that decides token ids: a fast tokenizer's full JSON (normaliser,
    pre-tokeniser, vocabulary), else the vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Truncation/padding are per-call settings a fast tokenizer keeps from its last call.
        state.pop("truncation", None)
        state.pop("padding", None)
        text = json.dumps(state, sort_keys=True)
    else:
        text = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens])
    return _sha(type(tokenizer).__name__.encode(), text.encode())


def data_fingerprint(raw) -> str:
    """A hash of a raw split's content (texts, labels, idx), independent of where it is stored."""
    digest = hashlib.sha256()
    for column in sorted(raw.column_names):
        digest.update(column.encode())
        digest.update(json.dumps(raw.data.column(column).to_pylist()).encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------- the plan


@dataclass
class CacheSpec:
    """What a run needs from the teacher: which outputs, for which teacher layers."""

    fields: tuple[str, ...]  # subset of CACHEABLE, always with "logits"
    layers: tuple[int, ...]  # 1-based teacher layers (empty without layer-wise terms)

    def files(self) -> list[str]:
        names = ["logits"]
        for pooled in POOLED:
            if pooled in self.fields:
                names += [f"{pooled}_L{t}" for t in self.layers]
        if "attention_qk" in self.fields:
            names += [f"qk_L{t}" for t in self.layers]
        return names


def spec_for(losses: dict, pairs, strict: bool = True) -> CacheSpec:
    """The cache a run with these loss terms and layer pairs reads. Terms with weight 0
    count too: a schedule stage may turn them on. A term that needs a teacher output the
    cache does not store (every token's hidden states, the attention values) is refused
    by name; ``strict=False`` (``dskd plan``) leaves it out instead."""
    from dskd.losses import LOSS_REGISTRY, term_type

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


def identity_for(cfg, tokenizer, data_fingerprints: dict[str, str], teacher_hash: str | None) -> dict:
    """What a cache is of: two caches (or a cache and a run) with equal identities hold
    the same teacher outputs for the same token sequences."""
    from dskd.data import get_task

    return {
        "teacher": teacher_hash,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "task": get_task(cfg.data.task).name,
        "max_length": cfg.data.max_length,
        "data": dict(data_fingerprints),
    }


def token_lengths(dataset) -> np.ndarray:
    """Each tokenised example's length (its real tokens), read from the Arrow column."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.data.column("input_ids")).to_numpy().astype(np.int64)


def field_shapes(spec: CacheSpec, examples: int, tokens: int, hidden: int, labels: int) -> dict[str, tuple]:
    shapes = {"logits": (examples, labels)}
    for name in spec.files()[1:]:
        shapes[name] = (tokens, 2, hidden) if name.startswith("qk_") else (examples, hidden)
    return shapes


def estimate_bytes(spec: CacheSpec, examples: int, tokens: int, hidden: int, labels: int, dtype: str) -> dict:
    """Bytes per field group for one split (plus the small index arrays)."""
    size = element_size(dtype)
    out = {"logits": examples * labels * 4, "index": examples * 3 * 8}
    for pooled in POOLED:
        if pooled in spec.fields:
            out[pooled] = len(spec.layers) * examples * hidden * size
    if "attention_qk" in spec.fields:
        out["attention_qk"] = len(spec.layers) * tokens * 2 * hidden * size
    return out


def attention_map_bytes(lengths: np.ndarray, layers: int, heads: int, dtype: str) -> int:
    """What the same attention would take stored as per-example L x L maps (for comparison)."""
    return int((lengths.astype(np.int64) ** 2).sum()) * layers * heads * element_size(dtype)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


# --------------------------------------------------------------------- arrays


def _to_numpy(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    tensor = tensor.detach().to("cpu", STORAGE_DTYPES[dtype] if dtype != "float32" else torch.float32)
    if dtype == "bfloat16":
        return tensor.contiguous().view(torch.uint16).numpy()
    return tensor.contiguous().numpy()


def _to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def _open_new(path: Path, shape: tuple, dtype) -> np.memmap:
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def crc32_file(path: Path) -> int:
    value = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return value


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------- writing


def shard_plan(lengths: np.ndarray, rank: int, world: int, batch_size: int) -> tuple[np.ndarray, list[range]]:
    """Rank ``rank``'s dataset positions in storage order (longest first, so batches pad
    little) and its batches as row ranges of that order."""
    positions = np.arange(rank, len(lengths), world)
    order = positions[np.argsort(-lengths[positions], kind="stable")]
    batches = [range(i, min(i + batch_size, len(order))) for i in range(0, len(order), batch_size)]
    return order, batches


class ShardWriter:
    """One rank's shard of one split; resumable at batch granularity."""

    def __init__(self, folder: Path, spec: CacheSpec, dataset, rank: int, world: int, batch_size: int,
                 hidden: int, labels: int, dtype: str):
        self.folder, self.spec, self.dtype = folder, spec, dtype
        lengths = token_lengths(dataset)
        idx = dataset.data.column("idx").to_numpy().astype(np.int64)
        self.order, self.batches = shard_plan(lengths, rank, world, batch_size)
        self.lengths = lengths[self.order]
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.tokens = int(self.lengths.sum())
        shapes = field_shapes(spec, len(self.order), self.tokens, hidden, labels)
        folder.mkdir(parents=True, exist_ok=True)
        progress = folder / "progress.json"
        self.done = json.loads(progress.read_text())["batches"] if progress.is_file() else 0
        self.arrays = {}
        for name, shape in shapes.items():
            path = folder / f"{name}.npy"
            np_dtype = np.float32 if name == "logits" else _NUMPY[dtype]
            if self.done and path.is_file():
                array = np.load(path, mmap_mode="r+")
                if array.shape != shape or array.dtype != np_dtype:
                    self.done, array = 0, _open_new(path, shape, np_dtype)
            else:
                array = _open_new(path, shape, np_dtype)
            self.arrays[name] = array
        if not self.done:
            for name, values in (("index", idx[self.order]), ("lengths", self.lengths), ("offsets", self.offsets)):
                np.save(folder / f"{name}.npy", values)

    def write(self, rows: range, outputs: dict, mask: torch.Tensor) -> None:
        self.arrays["logits"][rows.start : rows.stop] = outputs["logits"].float().cpu().numpy()
        real = mask.bool()
        for i, t in enumerate(self.spec.layers):
            for pooled in POOLED:
                if pooled in self.spec.fields:
                    self.arrays[f"{pooled}_L{t}"][rows.start : rows.stop] = _to_numpy(outputs[pooled][i], self.dtype)
            if "attention_qk" in self.spec.fields:
                q, k = outputs["attention_qk"][i]
                b, h, s, d = q.shape
                both = torch.stack([q, k], dim=2).permute(0, 3, 2, 1, 4).reshape(b, s, 2, h * d)
                first = int(self.offsets[rows.start])
                packed = both[real]  # the real tokens, example by example: this batch's token rows
                self.arrays[f"qk_L{t}"][first : first + packed.shape[0]] = _to_numpy(packed, self.dtype)

    def mark(self, batches_done: int) -> None:
        """Make everything up to ``batches_done`` durable, then record it as the resume point."""
        for array in self.arrays.values():
            array.flush()
        self.done = batches_done
        _write_json(self.folder / "progress.json", {"batches": batches_done})

    def finish(self) -> dict:
        files = {}
        for path in sorted(self.folder.glob("*.npy")):
            files[path.name] = {"bytes": path.stat().st_size, "crc32": crc32_file(path)}
        info = {"examples": len(self.order), "tokens": self.tokens, "files": files}
        _write_json(self.folder / "done.json", info)
        return info


def _diff(expected: dict, found: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key), found.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _diff(a, b, name + ".")
        elif a != b:
            diffs.append(f"{name}: cache {b!r}, run {a!r}")
    return diffs


def write(out: Path, identity: dict, layout: dict, about: dict, splits: dict, teacher, spec: CacheSpec,
          batch_size: int, tokenizer, teacher_config: dict, overwrite: bool, log=print, flush_every: int = 50,
          specs: dict[str, CacheSpec] | None = None) -> dict:
    """Write (or finish writing) the cache on every rank; return the manifest.
    ``specs`` overrides ``spec`` for some splits (Glitter's candidates: logits only).

    ``identity`` says what the cache is of (teacher, tokenizer, data, max length);
    ``layout`` how it is stored (fields, layers, dtype, world size, batch size); ``about``
    is for people (teacher path, command) and is not compared. A folder
    holding an unfinished cache of the same identity and layout is resumed; anything
    else there is refused unless ``overwrite``.
    """
    from dskd import data, engine as eng, models

    rank, world = eng.rank(), eng.world_size()
    pending = {"format": FORMAT, "version": FORMAT_VERSION, "identity": identity, "layout": layout}
    state = _existing_state(out, pending, overwrite)
    pending = dict(pending, about=about)  # every rank checks; only rank 0 writes below
    if state == "complete":
        log(f"[cache] {out} already holds this complete cache; nothing to do")
        return json.loads((out / MANIFEST).read_text())
    eng.barrier()
    if rank == 0:
        if state == "fresh" and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / PENDING, pending)
        tokenizer.save_pretrained(out / "tokenizer")
        _write_json(out / "teacher_config.json", teacher_config)
    eng.barrier()

    hidden, labels = teacher_config["hidden_size"], teacher_config["num_labels"]
    device = next(teacher.model.parameters()).device
    pad_id = tokenizer.pad_token_id
    shards = {}
    for split, dataset in splits.items():
        split_spec = (specs or {}).get(split, spec)
        writer = ShardWriter(out / split / f"shard-{rank}", split_spec, dataset, rank, world, batch_size, hidden,
                             labels, layout["dtype"])
        if writer.done:
            log(f"[cache] {split}: resuming at batch {writer.done}/{len(writer.batches)}")
        started, last_flush = time.perf_counter(), time.perf_counter()
        for number, rows in enumerate(writer.batches[writer.done :], start=writer.done + 1):
            batch = data.collate([dataset[int(p)] for p in writer.order[rows.start : rows.stop]], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            outputs = models.teacher_outputs(teacher.model, batch, frozenset(split_spec.fields), teacher.capture,
                                             list(split_spec.layers))
            writer.write(rows, outputs, batch["attention_mask"])
            if number % flush_every == 0 or time.perf_counter() - last_flush > 60:
                writer.mark(number)
                last_flush = time.perf_counter()
        writer.mark(len(writer.batches))
        shards[split] = writer.finish()
        log(f"[cache] {split}: {shards[split]['examples']} examples, {shards[split]['tokens']} tokens on rank "
            f"{rank} in {time.perf_counter() - started:.1f} s")
    gathered = [shards]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, shards)
    manifest = dict(pending, shards={split: [g[split] for g in gathered] for split in splits},
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    eng.barrier()
    if rank == 0:
        _write_json(out / MANIFEST, manifest)
    eng.barrier()
    return manifest


def _existing_state(out: Path, pending: dict, overwrite: bool) -> str:
    """"fresh", "resume" or "complete" for the folder ``out``; refuses what it must not touch."""
    if out.exists() and not out.is_dir():
        raise DskdError(f"--output {out} is a file; give a folder for the cache")
    if not out.exists() or not any(out.iterdir()):
        return "fresh"
    if not (out / PENDING).is_file():
        raise DskdError(f"--output {out} is not empty and holds no dskd teacher cache; choose another folder "
                        "(--overwrite replaces only a teacher cache)")
    if overwrite:
        return "fresh"
    previous = json.loads((out / PENDING).read_text())
    previous.pop("about", None)
    if previous.get("identity") != pending["identity"] or previous.get("version") != pending["version"]:
        diffs = _diff(pending, previous)
        raise DskdError(f"--output {out} holds a cache of something else ({'; '.join(diffs)}); "
                        "pass --overwrite to replace it, or choose another folder")
    diffs = _diff(pending["layout"], previous.get("layout", {}), "layout.")
    if diffs:
        raise DskdError(f"--output {out} holds a cache of this run written with other settings ({'; '.join(diffs)}); "
                        "rerun with those settings (ranks, --dtype, --batch-size, --deepspeed) to finish it, or pass "
                        "--overwrite to start over")
    return "complete" if (out / MANIFEST).is_file() else "resume"


# --------------------------------------------------------------------- reading


class TeacherCache:
    """A complete cache opened for reading; ``outputs`` has the online teacher's interface."""

    def __init__(self, path: str | Path, key: str = "teacher.cache"):
        self.path, self.key = Path(path), key
        if not self.path.is_dir():
            raise DskdError(f"`{key}`: {self.path} does not exist; write it with `dskd cache-teacher --config C "
                            f"--output {self.path}`")
        if not (self.path / MANIFEST).is_file():
            if (self.path / PENDING).is_file():
                raise DskdError(
                    f"`{key}`: {self.path} is an unfinished cache (its writing was interrupted); finish it by "
                    "running the same `dskd cache-teacher` command again, which resumes where it stopped"
                )
            raise DskdError(f"`{key}`: {self.path} is not a dskd teacher cache (no {MANIFEST})")
        try:
            self.manifest = json.loads((self.path / MANIFEST).read_text())
        except json.JSONDecodeError as exc:
            raise DskdError(f"`{key}`: {self.path / MANIFEST} is corrupt ({exc}); rewrite the cache") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != FORMAT_VERSION:
            raise DskdError(
                f"`{key}`: {self.path} has format {self.manifest.get('format')} v{self.manifest.get('version')}; "
                f"this dskd reads {FORMAT} v{FORMAT_VERSION}; rewrite it with this version's `dskd cache-teacher`"
            )
        layout = self.manifest["layout"]
        self.dtype = layout["dtype"]
        self.fields = tuple(layout["fields"])
        self.layers = tuple(layout["layers"])
        self.teacher_config = json.loads((self.path / "teacher_config.json").read_text())
        self.heads = self.teacher_config["num_attention_heads"]
        self._splits: dict[str, dict] = {}

    @property
    def identity(self) -> dict:
        return self.manifest["identity"]

    def check(self, identity: dict, spec: CacheSpec, splits: list[str]) -> None:
        """Refuse a cache that is not of this run's teacher, tokenizer, data and max length,
        or lacks an output or layer the run's losses read."""
        expected, found = dict(identity), dict(self.identity)
        if AUGMENT not in expected.get("data", {}) and AUGMENT in found.get("data", {}):
            # A run without Glitter's candidates may read a cache that also holds theirs.
            found["data"] = {k: v for k, v in found["data"].items() if k != AUGMENT}
        if expected["teacher"] is None:  # teacher.path unset: no weights to compare with
            expected.pop("teacher")
            found.pop("teacher", None)
        diffs = _diff(expected, found)
        if diffs:
            raise DskdError(
                f"`{self.key}`: {self.path} was written for a different run ({'; '.join(diffs)}); write a cache "
                "for this config with `dskd cache-teacher`, or point teacher.cache at the matching one"
            )
        missing = [f for f in spec.fields if f not in self.fields]
        if missing:
            raise DskdError(f"`{self.key}`: {self.path} does not store {', '.join(missing)}, which the configured "
                            f"losses need (it stores {', '.join(self.fields)}); rewrite it with this config")
        absent = [t for t in spec.layers if t not in self.layers]
        if absent:
            raise DskdError(f"`{self.key}`: {self.path} stores teacher layers {list(self.layers)}; the layer map "
                            f"also needs {absent}; rewrite it with this config")
        for split in splits:
            if split not in self.manifest["shards"]:
                raise DskdError(f"`{self.key}`: {self.path} has no `{split}` split "
                                f"(it has {', '.join(self.manifest['shards'])})")

    def verify(self, mode: str, rank: int = 0, world: int = 1) -> None:
        """Sizes of every file (and, with ``full``, this rank's share of checksums) against the manifest."""
        bad = []
        jobs = []
        for split, shards in self.manifest["shards"].items():
            for r, shard in enumerate(shards):
                for name, info in shard["files"].items():
                    path = self.path / split / f"shard-{r}" / name
                    jobs.append((path, info))
        for i, (path, info) in enumerate(jobs):
            if not path.is_file():
                bad.append(f"{path} is missing")
            elif path.stat().st_size != info["bytes"]:
                bad.append(f"{path} has {path.stat().st_size} bytes, the manifest says {info['bytes']} (truncated?)")
            elif mode == "full" and i % world == rank and crc32_file(path) != info["crc32"]:
                bad.append(f"{path} fails its checksum")
        if world > 1:
            everyone = [None] * world
            torch.distributed.all_gather_object(everyone, bad)
            bad = sorted({b for part in everyone for b in part})
        if bad:
            raise DskdError(f"`{self.key}`: {self.path} is damaged: {'; '.join(bad[:5])}"
                            f"{f' (+{len(bad) - 5} more)' if len(bad) > 5 else ''}; rewrite it with "
                            "`dskd cache-teacher --overwrite`")

    def _split(self, split: str) -> dict:
        if split not in self._splits:
            shards = []
            for r in range(len(self.manifest["shards"][split])):
                folder = self.path / split / f"shard-{r}"
                shards.append({name[:-4]: np.load(folder / name, mmap_mode="r")
                               for name in self.manifest["shards"][split][r]["files"]})
            idx = np.concatenate([s["index"] for s in shards])
            where = np.full(int(idx.max()) + 1 if len(idx) else 0, -1, dtype=np.int64)
            shard_of = np.concatenate([np.full(len(s["index"]), r) for r, s in enumerate(shards)])
            row_of = np.concatenate([np.arange(len(s["index"])) for s in shards])
            where[idx] = np.arange(len(idx))
            self._splits[split] = {"shards": shards, "where": where, "shard_of": shard_of, "row_of": row_of}
        return self._splits[split]

    def locate(self, split: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        table = self._split(split)
        where = table["where"]
        known = (idx >= 0) & (idx < len(where))
        slot = np.where(known, where[np.clip(idx, 0, max(len(where) - 1, 0))], -1)
        if (slot < 0).any():
            missing = idx[slot < 0][:5].tolist()
            raise DskdError(f"`{self.key}`: {self.path} has no `{split}` example with idx {missing}; the data differ "
                            "from the cache's")
        return table["shard_of"][slot], table["row_of"][slot]

    def outputs(self, batch: dict, needs: frozenset[str], pairs=(), split: str = "train") -> dict:
        """The teacher outputs of ``batch`` (read by its ``idx``), shaped as the online teacher's."""
        idx = batch["idx"].cpu().numpy()
        mask = batch["attention_mask"]
        device = mask.device
        shard_of, row_of = self.locate(split, idx)
        shards = self._split(split)["shards"]
        result = {"logits": self._gather(shards, "logits", shard_of, row_of, "float32").to(device)}
        layers = [t for _, t in pairs]
        for pooled in POOLED:
            if layers and pooled in needs:
                result[pooled] = [self._gather(shards, f"{pooled}_L{t}", shard_of, row_of, self.dtype).to(device)
                                  for t in layers]
        if layers and "attention_qk" in needs:
            result["attention_qk"] = self._attention(shards, layers, shard_of, row_of, mask, idx, split)
        return result

    @staticmethod
    def _gather(shards, name, shard_of, row_of, dtype) -> torch.Tensor:
        first = shards[0][name]
        out = np.empty((len(row_of), *first.shape[1:]), dtype=first.dtype)
        for r in np.unique(shard_of):
            pick = shard_of == r
            out[pick] = shards[r][name][row_of[pick]]
        return _to_torch(out, dtype)

    def _attention(self, shards, layers, shard_of, row_of, mask, idx, split) -> list:
        b, s = mask.shape
        lengths = mask.sum(-1).cpu().numpy()
        stored = np.array([shards[r]["lengths"][row] for r, row in zip(shard_of, row_of)])
        if (stored != lengths).any():
            i = int(np.flatnonzero(stored != lengths)[0])
            raise DskdError(
                f"`{self.key}`: `{split}` example idx {int(idx[i])} has {int(lengths[i])} tokens in this run but "
                f"{int(stored[i])} in {self.path}; the tokenizer, max length or data differ from the cache's"
            )
        real = mask.bool().cpu()
        hidden = self.teacher_config["hidden_size"]
        heads = self.heads
        out = []
        for t in layers:
            packed = []
            for r, row in zip(shard_of, row_of):
                first = int(shards[r]["offsets"][row])
                packed.append(shards[r][f"qk_L{t}"][first : first + int(shards[r]["lengths"][row])])
            tokens = _to_torch(np.concatenate(packed), self.dtype)
            padded = torch.zeros(b, s, 2, hidden, dtype=tokens.dtype)
            padded[real] = tokens
            padded = padded.to(mask.device)
            # The online teacher's layout ([B, S, H, D] transposed to [B, H, S, D]), so the
            # loss sees identical strides and gives identical numbers.
            q, k = (padded[:, :, i].contiguous().view(b, s, heads, hidden // heads).transpose(1, 2) for i in (0, 1))
            out.append((q, k))
        return out


# ----------------------------------------------------------------- the command


def cache_teacher(cfg, out: Path, deepspeed_path: str | None, dtype: str | None, batch_size: int | None,
                  overwrite: bool, argv: list[str]) -> dict:
    """``dskd cache-teacher``: run the teacher once over train and dev, every rank its shard."""
    from dskd import data, engine as eng, models, trainer
    from dskd.capture import QKCapture

    eng.init_distributed()
    training = cfg.training
    ds_config, _ = eng.load_ds_config(deepspeed_path or training.deepspeed, training)
    eng.check_precision_supported(ds_config, deepspeed_path or training.deepspeed)
    compute = eng.run_dtype(ds_config)
    store = storage_dtype(dtype or str(compute).replace("torch.", ""))
    batch_size = 2 * training.batch_size if batch_size is None else batch_size
    if batch_size < 1:
        raise DskdError(f"--batch-size must be at least 1, got {batch_size}")
    task = data.get_task(cfg.data.task)
    if cfg.teacher.path is None and cfg.teacher.arch is None:
        raise DskdError("`dskd cache-teacher` runs the teacher: set `teacher.path` or `teacher.arch`")
    tokenizer = models.load_tokenizer(cfg.teacher)
    fingerprints: dict = {}
    train_set, dev_set = trainer.load_data(cfg, task, tokenizer, fingerprints)
    splits, specs = {"train": train_set, "dev": dev_set}, {}
    from dskd import glitter

    candidates = glitter.open_candidates(cfg, task, tokenizer, fingerprints)  # adds the pool to the identity
    if candidates is not None:
        splits[AUGMENT], specs[AUGMENT] = candidates.view, CacheSpec(("logits",), ())
    model = trainer.load_teacher(cfg, task, tokenizer)
    init_layers, n_student = models.student_layer_plan(cfg.student, model.config.num_hidden_layers)
    pairs = trainer.mapped_pairs(cfg, cfg.losses, init_layers, n_student, model.config.num_hidden_layers)
    spec = spec_for(cfg.losses, pairs)
    identity = identity_for(cfg, tokenizer, fingerprints, teacher_fingerprint(cfg.teacher, cfg.seed))
    # num_labels is implied by id2label in the JSON; the reader wants it spelled out.
    teacher_config = {**json.loads(model.config.to_json_string()), "num_labels": model.config.num_labels}
    model = models.freeze(model, compute, eng.device())
    capture = QKCapture(model, list(spec.layers), "teacher") if "attention_qk" in spec.fields else None
    layout = {"fields": list(spec.fields), "layers": list(spec.layers), "dtype": store,
              "compute_dtype": str(compute).replace("torch.", ""), "world_size": eng.world_size(),
              "batch_size": batch_size}
    if candidates is not None:
        layout[AUGMENT] = {"fields": ["logits"], "candidates_per_example": candidates.n, "key": "candidate id"}
    about = {"teacher_path": cfg.teacher.path, "data_path": cfg.data.path, "augment_path": cfg.data.augment,
             "command": argv}
    def log(*parts) -> None:  # progress goes to stderr, as the trainer's log lines do
        if eng.rank() == 0:
            print(*parts, file=sys.stderr, flush=True)

    from dskd.trainer import TeacherSide

    return write(out, identity, layout, about, splits, TeacherSide(model, capture), spec, batch_size, tokenizer,
                 teacher_config, overwrite, log, specs=specs)


def cache_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.npy"))
