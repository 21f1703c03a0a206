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
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dskd.data import data_fingerprint  # noqa: F401  (part of the cache's identity)
from dskd.errors import DskdError
from dskd.runtime import dist

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
    from dskd import data, models

    rank, world = dist.rank(), dist.world_size()
    pending = {"format": FORMAT, "version": FORMAT_VERSION, "identity": identity, "layout": layout}
    state = _existing_state(out, pending, overwrite)
    pending = dict(pending, about=about)  # every rank checks; only rank 0 writes below
    if state == "complete":
        log(f"[cache] {out} already holds this complete cache; nothing to do")
        return json.loads((out / MANIFEST).read_text())
    dist.barrier()
    if rank == 0:
        if state == "fresh" and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / PENDING, pending)
        tokenizer.save_pretrained(out / "tokenizer")
        _write_json(out / "teacher_config.json", teacher_config)
    dist.barrier()

    hidden, labels = teacher_config["hidden_size"], teacher_config["num_labels"]
    device = next(teacher.model.parameters()).device
    shards = {}
    for split, dataset in splits.items():
        split_spec = (specs or {}).get(split, spec)
        writer = ShardWriter(out / split / f"shard-{rank}", split_spec, dataset, rank, world, batch_size, hidden,
                             labels, layout["dtype"])
        if writer.done:
            log(f"[cache] {split}: resuming at batch {writer.done}/{len(writer.batches)}")
        started, last_flush = time.perf_counter(), time.perf_counter()
        for number, rows in enumerate(writer.batches[writer.done :], start=writer.done + 1):
            batch = data.collate([dataset[int(p)] for p in writer.order[rows.start : rows.stop]], tokenizer)
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
    dist.barrier()
    if rank == 0:
        _write_json(out / MANIFEST, manifest)
    dist.barrier()
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


def cache_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.npy"))
