"""Raw-text corpora (dskd/data/corpus.py): reading .txt/.jsonl/.parquet files and folders,
packing into fixed-length blocks by hand-checked token ids, streamed = in memory, the
held-out tail, and one clear error per bad input."""

from __future__ import annotations

import itertools
import json

import datasets
import pytest
from conftest import BERT_VOCAB, SHARED_DATA, require_shared

from dskd.data import corpus
from dskd.errors import DskdError

WIKITEXT = SHARED_DATA / "corpus" / "wikitext-2"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab=str(BERT_VOCAB))


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")


def test_units_are_joined_by_the_separator_and_cut_into_framed_blocks(tokenizer):
    pack = corpus.block_packer(tokenizer, max_length=6)  # 4 tokens of text per block
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in ("the", "cat", "sat", "on", "mat", "a")}
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    out = pack({"text": ["the cat sat", "on a", "mat"]})
    # stream: the cat sat SEP on a SEP mat SEP (9 tokens) -> two blocks of 4, the last token dropped
    assert out["input_ids"] == [[cls, ids["the"], ids["cat"], ids["sat"], sep, sep],
                                [cls, ids["on"], ids["a"], sep, ids["mat"], sep]]
    assert out["attention_mask"] == [[1] * 6, [1] * 6]
    assert pack({"text": ["the"]}) == {"input_ids": [], "attention_mask": []}  # shorter than a block: dropped


def test_txt_jsonl_and_parquet_give_the_same_blocks_and_folders_are_read_in_order(tmp_path, tokenizer):
    lines = ["the cat sat on the mat .", "", "  ", "a dog ran in the park and the cat ran too .",
             "= heading =", "more words to make another block of text here ."] * 4
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "b.txt").write_text("\n".join(lines[12:]) + "\n")
    (tmp_path / "txt" / "a.txt").write_text("\n".join(lines[:12]) + "\n")
    records = [{"body": line, "id": i} for i, line in enumerate(lines)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "c.parquet"))

    def blocks(paths, **kw):
        return corpus.pack_corpus(corpus.read_corpus(paths, **kw), tokenizer, 8)

    from_txt = blocks([str(tmp_path / "txt")])  # a.txt before b.txt
    assert len(from_txt) > 4 and from_txt["idx"] == list(range(len(from_txt)))
    assert blocks([str(tmp_path / "c.jsonl")], text_field="body")["input_ids"] == from_txt["input_ids"]
    assert blocks([str(tmp_path / "c.parquet")], text_field="body")["input_ids"] == from_txt["input_ids"]
    assert all(len(ids) == 8 for ids in from_txt["input_ids"])


def test_a_streamed_corpus_gives_the_blocks_of_the_in_memory_one(tokenizer):
    require_shared("corpus", "wikitext-2")
    files = [str(WIKITEXT / "valid.txt")]
    in_memory = corpus.pack_corpus(corpus.read_corpus(files), tokenizer, 128)
    streamed = corpus.pack_corpus(corpus.read_corpus(files, streaming=True), tokenizer, 128)
    assert len(in_memory) > 2000  # about 250k word pieces of WikiText-2 validation text
    first = list(itertools.islice(iter(streamed), 50))
    assert [r["input_ids"] for r in first] == in_memory[:50]["input_ids"]
    assert [r["idx"] for r in first] == list(range(50))
    assert sum(1 for _ in streamed) == len(in_memory)


def test_the_held_out_slice_is_the_contiguous_tail(tokenizer):
    blocks = datasets.Dataset.from_dict({"idx": list(range(200)), "input_ids": [[1, 2]] * 200})
    train, held = corpus.split_held_out(blocks, 0.05)
    assert train["idx"] == list(range(190)) and held["idx"] == list(range(190, 200))
    train, held = corpus.split_held_out(blocks, 0.001)
    assert held["idx"] == [199]  # a positive share holds out at least one block
    assert corpus.split_held_out(blocks, 0.0)[1] is None


def test_bad_corpora_get_one_message_naming_the_key_or_file(tmp_path, tokenizer):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "notes.md").write_text("text")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a.txt").write_text("words\n")
    (tmp_path / "r.jsonl").write_text('{"body": "words"}\n')
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    cases = [
        ([str(tmp_path / "latin1.txt")], {}, r"latin1.txt is not UTF-8 \(byte 3\)"),
        ([str(tmp_path / "notes.md")], {}, r"notes.md is not a corpus file"),
        ([str(tmp_path / "empty")], {}, r"folder .*empty holds no"),
        ([str(tmp_path / "missing.txt")], {}, r"missing.txt does not exist"),
        ([], {}, r"`data.corpus` names no file"),
        ([str(tmp_path / "a.txt"), str(tmp_path / "r.jsonl")], {}, r"mixes file kinds \(json, text\)"),
        ([str(tmp_path / "r.jsonl")], {"text_field": "text"}, r"`data.corpus.text_field` is 'text', but .* body"),
    ]
    for paths, kw, message in cases:
        with pytest.raises(DskdError, match=message):
            corpus.read_corpus(paths, **kw)
    blocks = corpus.pack_corpus(corpus.read_corpus([str(tmp_path / "blank.txt")]), tokenizer, 16)
    with pytest.raises(DskdError, match=r"the corpus gives no block; it is empty or shorter than one block"):
        corpus.split_held_out(blocks, 0.01)
    with pytest.raises(DskdError, match=r"`data.max_length` is 2; a corpus block needs at least 3 tokens"):
        corpus.block_packer(tokenizer, 2)
