"""Reading a teacher cache: ``TeacherCache.outputs`` serves a batch's teacher outputs by
example index, with the same interface as the online teacher (``dskd.teacher.online``).
The format is drawn in ``dskd.teacher.cache``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dskd.errors import DskdError
from dskd.teacher.cache import (
    AUGMENT, FORMAT, FORMAT_VERSION, MANIFEST, PENDING, POOLED, CacheSpec, _diff, _to_torch, crc32_file,
)


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
