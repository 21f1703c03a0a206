"""Raw-text corpora for task-agnostic distillation: the data of a corpus job (``data.corpus``).

A corpus is one or more local files or folders of ``.txt`` (one text unit per line; blank
lines and WikiText's ``= Heading =`` lines are kept as text, empty lines dropped), ``.jsonl``
(the ``text_field`` of each record) or ``.parquet`` files, read with ``datasets`` (in memory,
or streamed for corpora that do not fit). Every unit is tokenised without special tokens;
the units are concatenated in file order with the tokenizer's separator between them (across
document boundaries, as RoBERTa's FULL-SENTENCES packing does) and cut into blocks of
``max_length - 2`` tokens, each framed as ``[CLS] ... [SEP]``, so every block has exactly
``max_length`` tokens and no padding. The remainder shorter than a block is dropped.

Blocks carry ``idx`` (their position in the corpus), so the seeded batch order of
``data.epoch_batches`` and an exact resume apply to them as to a GLUE split. The held-out
slice is the corpus's last ``held_out`` share of blocks: a contiguous tail, so no held-out
block shares text with a training block.

:class:`CorpusTask` is the task interface (that of ``data.TaskSpec``) of a corpus job: no labels,
no per-example prediction; masked-LM terms get inputs masked per block, seeded by (seed, epoch,
block), so a resumed run, and a run on another number of ranks, sees the same masks.
"""

from __future__ import annotations

import codecs
import hashlib
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from dskd.config import resolve_path
from dskd.errors import DskdError

SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_CHECK_CHUNK = 8 << 20


def corpus_files(paths: list[str], key: str = "data.corpus") -> list[Path]:
    """The corpus files named by ``paths`` (files, or folders searched recursively), sorted per
    folder so the order (and hence the blocks) never depends on the file system."""
    if not paths:
        raise DskdError(f"`{key}` names no file; give one or more .txt, .jsonl or .parquet files or folders")
    found: list[Path] = []
    for raw in paths:
        path = Path(resolve_path(str(raw)))
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not inside:
                raise DskdError(f"`{key}`: folder {path} holds no {', '.join(SUFFIXES)} file")
            found += inside
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise DskdError(f"`{key}`: {path} is not a corpus file; use {', '.join(SUFFIXES)}")
            found.append(path)
        else:
            raise DskdError(f"`{key}`: {path} does not exist")
    kinds = {SUFFIXES[p.suffix] for p in found}
    if len(kinds) > 1:
        raise DskdError(f"`{key}` mixes file kinds ({', '.join(sorted(kinds))}); give files of one kind")
    for path in found:
        if SUFFIXES[path.suffix] != "parquet":
            _check_utf8(path, key)
    return found


def _check_utf8(path: Path, key: str) -> None:
    """Text files must be UTF-8; say which file and where it is not (datasets would not)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHECK_CHUNK):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise DskdError(f"`{key}`: {path} is not UTF-8 (byte {offset + exc.start}); convert it, e.g. "
                                f"iconv -f latin1 -t utf-8") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DskdError(f"`{key}`: {path} ends inside a UTF-8 character; the file is cut or not UTF-8") from None


def read_corpus(paths: list[str], text_field: str = "text", streaming: bool = False, key: str = "data.corpus"):
    """The corpus's text units, one per row in column ``text``, in file order (a ``datasets``
    ``Dataset``, or an ``IterableDataset`` with ``streaming``)."""
    files = corpus_files(paths, key)
    kind = SUFFIXES[files[0].suffix]
    kwargs = {"keep_linebreaks": False} if kind == "text" else {}
    corpus = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", streaming=streaming,
                                   **kwargs)
    columns = corpus.column_names if not streaming else list(corpus.features or {})
    if kind != "text" and columns and text_field not in columns:
        raise DskdError(f"`{key}.text_field` is {text_field!r}, but {files[0]} has the fields {', '.join(columns)}")
    if kind != "text":
        corpus = corpus.select_columns([text_field]).rename_column(text_field, "text") if text_field != "text" \
            else corpus.select_columns(["text"])
    return corpus.filter(lambda row: bool(row["text"] and row["text"].strip()))


def block_packer(tokenizer, max_length: int):
    """A batched ``map`` function: text units -> fixed-length blocks (``max_length`` tokens,
    ``[CLS] ... [SEP]``). Units are joined with the separator; a block never holds padding."""
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise DskdError("the corpus blocks are framed with the tokenizer's [CLS] and [SEP] (or <s> and </s>), "
                        "which this tokenizer lacks")
    body = max_length - 2
    if body < 1:
        raise DskdError(f"`data.max_length` is {max_length}; a corpus block needs at least 3 tokens")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id

    def pack(batch: dict[str, list]) -> dict[str, list]:
        stream: list[int] = []
        for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]:
            if ids:
                stream += ids + [sep]
        blocks = [[cls] + stream[i : i + body] + [sep] for i in range(0, len(stream) - body + 1, body)]
        return {"input_ids": blocks, "attention_mask": [[1] * max_length for _ in blocks]}

    return pack


def pack_corpus(corpus, tokenizer, max_length: int, units_per_map: int = 1000):
    """``corpus`` (from :func:`read_corpus`) as blocks with ``input_ids``, ``attention_mask`` and
    ``idx``. The stream is cut within groups of ``units_per_map`` text units (each group's
    remainder is dropped), which is what keeps a streamed corpus and an in-memory one the same
    blocks and lets ``datasets`` work in bounded memory."""
    pack = block_packer(tokenizer, max_length)
    kwargs = {} if isinstance(corpus, datasets.IterableDataset) else {"desc": "pack corpus"}
    blocks = corpus.map(pack, batched=True, batch_size=units_per_map, remove_columns=["text"], **kwargs)
    return blocks.map(lambda row, i: {"idx": i}, with_indices=True)


def split_held_out(blocks: datasets.Dataset, share: float, key: str = "data.corpus") -> tuple:
    """(training blocks, held-out blocks): the held-out slice is the last ``round(share * n)``
    blocks (at least one when ``share`` > 0), a contiguous tail."""
    n = len(blocks)
    if n == 0:
        raise DskdError(f"`{key}`: the corpus gives no block; it is empty or shorter than one block "
                        "(data.max_length tokens)")
    count = max(1, round(share * n)) if share > 0 else 0
    if count >= n:
        raise DskdError(f"`{key}`: holding out {count} of {n} blocks leaves none to train on; lower the held-out "
                        "share or give more text")
    return blocks.select(range(n - count)), blocks.select(range(n - count, n)) if count else None


@dataclass(frozen=True)
class CorpusTask:
    """A corpus job seen through the task interface of ``data.TaskSpec``. ``mlm``: masked-LM
    terms are configured, so the models carry an MLM head and training inputs are masked."""

    mlm: bool
    mask_probability: float = 0.15
    seed: int = 0

    name = "corpus"
    num_labels = 0
    is_regression = False
    prediction = None  # nothing per example is scored: evaluation is the held-out losses
    units = "held-out blocks"

    @property
    def main_metric(self) -> str:
        """Higher is better: masked-LM accuracy, or the negated held-out distillation loss."""
        return "mlm_accuracy" if self.mlm else "neg_loss"

    @property
    def model_class(self) -> str:
        return "AutoModelForMaskedLM" if self.mlm else "AutoModel"

    def collator(self, tokenizer, epoch: int):
        """Rows -> a batch; with ``mlm``, masked for ``epoch`` (held-out blocks: epoch -1, fixed)."""
        from dskd.data.batches import collate

        if not self.mlm:
            return lambda rows: collate(rows, tokenizer)
        masker = BlockMasker(tokenizer, self.mask_probability, self.seed)
        return lambda rows: masker(collate(rows, tokenizer), epoch)


class BlockMasker:
    """Dynamic masking with transformers' ``DataCollatorForLanguageModeling`` (80% [MASK], 10% a
    random token, 10% kept; special tokens never), one generator per block seeded by (seed,
    epoch, block idx): the mask of a block does not depend on its batch, rank or a resume."""

    def __init__(self, tokenizer, probability: float, seed: int):
        from transformers import DataCollatorForLanguageModeling

        if tokenizer.mask_token_id is None:
            raise DskdError("masked-LM terms need a tokenizer with a mask token ([MASK] or <mask>); this one has none")
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=probability)
        self.special = torch.tensor(sorted(tokenizer.all_special_ids))
        self.seed = seed

    def block_seed(self, epoch: int, idx: int) -> int:
        key = f"{self.seed}/{epoch}/{idx}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)

    def __call__(self, batch: dict, epoch: int) -> dict:
        ids = batch["input_ids"]
        special = torch.isin(ids, self.special) | (batch["attention_mask"] == 0)
        inputs, labels = [], []
        for row, skip, idx in zip(ids, special, batch["idx"].tolist(), strict=True):
            self.collator.generator = torch.Generator().manual_seed(self.block_seed(epoch, idx))
            masked, target = self.collator.torch_mask_tokens(row[None].clone(), skip[None])
            inputs.append(masked)
            labels.append(target)
        return dict(batch, input_ids=torch.cat(inputs), labels=torch.cat(labels))


def corpus_fingerprint(files: list[Path], tokenizer_name: str, max_length: int) -> str:
    """What names a corpus's blocks: its files (path, size, modification time), tokenizer and block length."""
    digest = hashlib.sha256(f"{tokenizer_name}/{max_length}".encode())
    for file in files:
        stat = file.stat()
        digest.update(f"{file.resolve()}/{stat.st_size}/{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _materialise(blocks, identity: str):
    """A streamed corpus's blocks as a memory-mapped ``datasets`` table: random access for the
    seeded batch order and an exact resume, without ever holding the raw text. ``identity``
    (the corpus's fingerprint) keys the table in the ``datasets`` cache, so a changed file is
    packed again."""
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "attention_mask": datasets.Sequence(datasets.Value("int8")),
                                  "idx": datasets.Value("int64")})
    return datasets.Dataset.from_generator(_rows, gen_kwargs={"blocks": blocks, "identity": identity},
                                           features=features)


def _rows(blocks, identity: str):
    del identity  # only part of the cache key
    yield from blocks


def read_hub_corpus(corpus_cfg):
    """``data.corpus.dataset``: text units of a Hugging Face hub dataset (when the network or a
    local ``datasets`` cache allows)."""
    key = "data.corpus.dataset"
    try:
        corpus = datasets.load_dataset(corpus_cfg.dataset, corpus_cfg.dataset_config, split=corpus_cfg.split,
                                       streaming=corpus_cfg.streaming)
    except Exception as exc:  # datasets raises many types for a missing name, config or network
        offline = datasets.config.HF_HUB_OFFLINE or "offline" in str(exc).lower()
        why = "the hub is not reachable (offline mode: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); give local files " \
              "in data.corpus.files" if offline else str(exc).splitlines()[0]
        raise DskdError(f"`{key}`: could not load {corpus_cfg.dataset!r} (config {corpus_cfg.dataset_config!r}, "
                        f"split {corpus_cfg.split!r}): {why}") from None
    columns = list(corpus.features or {}) if corpus_cfg.streaming else corpus.column_names
    if corpus_cfg.text_field not in columns:
        raise DskdError(f"`data.corpus.text_field` is {corpus_cfg.text_field!r}, but {corpus_cfg.dataset} has the "
                        f"fields {', '.join(columns)}")
    corpus = corpus.select_columns([corpus_cfg.text_field])
    if corpus_cfg.text_field != "text":
        corpus = corpus.rename_column(corpus_cfg.text_field, "text")
    return corpus.filter(lambda row: bool(row["text"] and row["text"].strip()))


def load_corpus(corpus_cfg, tokenizer, max_length: int, fingerprints: dict | None = None):
    """(training blocks, held-out blocks) of ``data.corpus``. ``fingerprints``, when given, gets
    the number of blocks and the corpus's identity."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if corpus_cfg.dataset is not None:
        text = read_hub_corpus(corpus_cfg)
        identity = hashlib.sha256(f"{corpus_cfg.dataset}/{corpus_cfg.dataset_config}/{corpus_cfg.split}/{name}/"
                                  f"{max_length}".encode()).hexdigest()[:16]
    else:
        files = corpus_files(corpus_cfg.files, "data.corpus.files")
        text = read_corpus(corpus_cfg.files, corpus_cfg.text_field, corpus_cfg.streaming, "data.corpus.files")
        identity = corpus_fingerprint(files, name, max_length)
    blocks = pack_corpus(text, tokenizer, max_length)
    if corpus_cfg.streaming:
        blocks = _materialise(blocks, identity)
    train, held_out = split_held_out(blocks, corpus_cfg.held_out, "data.corpus")
    if corpus_cfg.max_blocks is not None and corpus_cfg.max_blocks < len(train):
        train = train.select(range(corpus_cfg.max_blocks))
    if fingerprints is not None:
        fingerprints["train"] = {"examples": len(train), "hash": identity}
        fingerprints["dev"] = {"examples": len(held_out), "hash": identity}
    return train, held_out
