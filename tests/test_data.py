from pathlib import Path

import datasets
import pytest
import torch

from conftest import BERT_VOCAB, SHARED_DATA, needs_shared
from dskd.data import (
    GLUE_TASKS,
    collate,
    get_task,
    load_split,
    read_glue_tsv,
    tokenize_split,
)
from dskd.errors import DskdError

GLUE = SHARED_DATA / "glue"

needs_glue = needs_shared("glue")


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    """Keep any cache file datasets might write out of the user's home."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


def write_tsv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bert_tokenizer():
    transformers = pytest.importorskip("transformers")
    # transformers 5 silently ignores BertTokenizerFast(vocab_file=...) and builds a
    # 5-token vocabulary; loading the folder works the same in versions 4 and 5.
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(BERT_VOCAB.parent))
    assert len(tokenizer) == 30522
    return tokenizer


# --- task lookup -----------------------------------------------------------------


def test_all_nine_tasks_are_defined():
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert get_task("mnli").num_labels == 3
    assert get_task("stsb").num_labels == 1 and get_task("stsb").is_regression
    assert get_task("mnli").hub_name == ("nyu-mll/glue", "mnli")


@pytest.mark.parametrize("name", ["sst2", "SST-2", "sst-2", "Sst_2"])
def test_get_task_accepts_spellings(name):
    assert get_task(name).name == "sst2"


def test_get_task_accepts_folder_name_of_stsb():
    assert get_task("STS-B").name == "stsb"


def test_unknown_task_suggests_close_name():
    with pytest.raises(DskdError) as excinfo:
        get_task("sst")
    message = str(excinfo.value)
    assert "data.task" in message
    assert "Did you mean 'sst2'?" in message
    assert "cola" in message  # lists the known names


# --- reading real GLUE files -----------------------------------------------------


@needs_glue
def test_read_sst2_dev():
    columns = read_glue_tsv(GLUE / "SST-2" / "dev.tsv", get_task("sst2"))
    assert set(columns) == {"text_a", "label", "idx"}
    assert len(columns["text_a"]) == 872
    # the trailing space before the tab is part of the original text
    assert columns["text_a"][0] == "it 's a charming and often affecting journey . "
    assert columns["label"][0] == 1
    assert columns["label"].count(1) == 444 and columns["label"].count(0) == 428
    assert columns["idx"] == list(range(872))


@needs_glue
def test_read_mrpc_dev_with_bom_header_and_unbalanced_quote():
    columns = read_glue_tsv(GLUE / "MRPC" / "dev.tsv", get_task("mrpc"))
    assert len(columns["label"]) == 408
    assert columns["label"].count(1) == 279
    assert columns["text_a"][0] == (
        "He said the foodservice pie business doesn't fit the company's long-term growth strategy."
    )
    # an opening quote with no closing one: a CSV reader would swallow the following lines
    assert columns["text_b"][0] == '"The foodservice pie business does not fit our long-term growth strategy.'


@needs_glue
def test_read_rte_dev_maps_string_labels():
    columns = read_glue_tsv(GLUE / "RTE" / "dev.tsv", get_task("rte"))
    assert len(columns["label"]) == 277
    assert columns["label"][:2] == [1, 0]  # not_entailment, entailment
    assert columns["label"].count(0) == 146 and columns["label"].count(1) == 131
    assert columns["text_b"][0] == "Christopher Reeve had an accident."


@needs_glue
def test_read_qnli_dev():
    columns = read_glue_tsv(GLUE / "QNLI" / "dev.tsv", get_task("qnli"))
    assert len(columns["label"]) == 5463
    assert columns["label"].count(0) == 2702
    assert columns["text_a"][0] == "What came into force after the new constitution was herald?"


@needs_glue
def test_limit_keeps_file_prefix():
    columns = read_glue_tsv(GLUE / "SST-2" / "dev.tsv", get_task("sst2"), limit=5)
    full = read_glue_tsv(GLUE / "SST-2" / "dev.tsv", get_task("sst2"))
    assert columns["text_a"] == full["text_a"][:5]
    assert columns["idx"] == [0, 1, 2, 3, 4]


# --- reading edge cases from temporary files -------------------------------------


def test_quotes_and_whitespace_are_literal(tmp_path):
    path = write_tsv(
        tmp_path / "dev.tsv",
        'sentence\tlabel\r\n"quoted" start\t1\r\nsays "hi\t0\r\n  padded  \t1\n\n\n',
    )
    columns = read_glue_tsv(path, get_task("sst2"))
    assert columns["text_a"] == ['"quoted" start', 'says "hi', "  padded  "]
    assert columns["label"] == [1, 0, 1]


def test_extra_columns_are_ignored(tmp_path):
    path = write_tsv(
        tmp_path / "dev_matched.tsv",
        "index\tsentence1\tsentence2\tlabel1\tlabel2\tgold_label\n"
        "0\tA man sleeps.\tA person rests.\tentailment\tneutral\tentailment\n"
        "1\tA cat.\tA dog.\tcontradiction\tcontradiction\tcontradiction\n",
    )
    columns = read_glue_tsv(path, get_task("mnli"))
    assert columns["label"] == [0, 2]
    assert columns["text_b"] == ["A person rests.", "A dog."]


def test_headerless_cola(tmp_path):
    path = write_tsv(
        tmp_path / "dev.tsv",
        "gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n",
    )
    columns = read_glue_tsv(path, get_task("cola"))
    assert columns == {
        "text_a": ["Our friends won't buy this analysis.", "They drank the pub."],
        "label": [1, 0],
        "idx": [0, 1],
    }


def test_stsb_float_labels(tmp_path):
    path = write_tsv(tmp_path / "dev.tsv", "sentence1\tsentence2\tscore\na\tb\t3.800\nc\td\t0\n")
    assert read_glue_tsv(path, get_task("stsb"))["label"] == [3.8, 0.0]


def test_extra_tab_reports_file_and_line(tmp_path):
    path = write_tsv(tmp_path / "dev.tsv", "sentence\tlabel\ngood\t1\nbad\textra\t0\n")
    with pytest.raises(DskdError) as excinfo:
        read_glue_tsv(path, get_task("sst2"))
    message = str(excinfo.value)
    assert f"{path}:3:" in message
    assert "expected 2 tab-separated fields" in message and "found 3" in message


def test_blank_line_inside_data_is_an_error(tmp_path):
    path = write_tsv(tmp_path / "dev.tsv", "sentence\tlabel\ngood\t1\n\nbad\t0\n")
    with pytest.raises(DskdError, match=r"dev\.tsv:3: expected 2"):
        read_glue_tsv(path, get_task("sst2"))


def test_bad_label_names_value_and_allowed_labels(tmp_path):
    path = write_tsv(tmp_path / "dev.tsv", "sentence\tlabel\ngood\t1\nbad\tpositive\n")
    with pytest.raises(DskdError) as excinfo:
        read_glue_tsv(path, get_task("sst2"))
    message = str(excinfo.value)
    assert f"{path}:3:" in message
    assert "'positive'" in message and "'0', '1'" in message


def test_non_numeric_stsb_score(tmp_path):
    path = write_tsv(tmp_path / "dev.tsv", "sentence1\tsentence2\tscore\na\tb\thigh\n")
    with pytest.raises(DskdError, match="'high'.*not a number"):
        read_glue_tsv(path, get_task("stsb"))


def test_header_only_file_has_no_data_rows(tmp_path):
    path = write_tsv(tmp_path / "dev.tsv", "sentence\tlabel\n")
    with pytest.raises(DskdError, match="no data rows"):
        read_glue_tsv(path, get_task("sst2"))


def test_missing_header_column(tmp_path):
    path = write_tsv(tmp_path / "dev.tsv", "text\tlabel\ngood\t1\n")
    with pytest.raises(DskdError, match="header has no column 'sentence'"):
        read_glue_tsv(path, get_task("sst2"))


def test_missing_file_names_path_and_layout(tmp_path):
    path = tmp_path / "SST-2" / "train.tsv"
    with pytest.raises(DskdError) as excinfo:
        read_glue_tsv(path, get_task("sst2"))
    message = str(excinfo.value)
    assert str(path) in message
    assert "<data.path>/SST-2/train.tsv" in message


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_bytes(b"sentence\tlabel\ngood\t1\nbad \xff\t0\n")
    with pytest.raises(DskdError, match=r"dev\.tsv:3: not valid UTF-8"):
        read_glue_tsv(path, get_task("sst2"))


# --- load_split ------------------------------------------------------------------


@needs_glue
@pytest.mark.parametrize("path", [GLUE, GLUE / "RTE"], ids=["glue-root", "task-folder"])
def test_load_split_from_root_or_task_folder(path):
    ds = load_split(get_task("rte"), str(path), "dev", limit=10)
    assert ds.column_names == ["text_a", "text_b", "label", "idx"]
    assert len(ds) == 10
    assert ds["idx"] == list(range(10))
    assert ds.features["label"].dtype == "int64"


def test_load_split_bad_path_names_data_path(tmp_path):
    with pytest.raises(DskdError, match="data.path") as excinfo:
        load_split(get_task("sst2"), str(tmp_path / "nowhere"), "train")
    assert str(tmp_path / "nowhere") in str(excinfo.value)


def test_load_split_folder_without_task_files(tmp_path):
    with pytest.raises(DskdError, match="contains neither SST-2/ nor train.tsv/dev.tsv"):
        load_split(get_task("sst2"), str(tmp_path), "dev")


@needs_glue
def test_load_split_missing_split_file():
    # QNLI ships without train.tsv in the shared data
    with pytest.raises(DskdError, match="QNLI/train.tsv does not exist"):
        load_split(get_task("qnli"), str(GLUE), "train")


def test_load_split_stsb_labels_are_float32(tmp_path):
    write_tsv(tmp_path / "dev.tsv", "sentence1\tsentence2\tscore\na\tb\t3.5\n")
    ds = load_split(get_task("stsb"), str(tmp_path), "dev")
    assert ds.features["label"].dtype == "float32"
    assert ds["label"] == [3.5]


def test_load_split_from_hub_renames_columns(monkeypatch):
    hub_rows = datasets.Dataset.from_dict(
        {
            "premise": ["p0", "p1", "p2"],
            "hypothesis": ["h0", "h1", "h2"],
            "label": [2, 0, 1],
            "idx": [0, 1, 2],
        },
        features=datasets.Features(
            {
                "premise": datasets.Value("string"),
                "hypothesis": datasets.Value("string"),
                "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
                "idx": datasets.Value("int32"),
            }
        ),
    )
    requested = []

    def fake_load_dataset(*args, **kwargs):
        requested.append((args, kwargs))
        return hub_rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_split(get_task("mnli"), None, "dev", limit=2)
    assert requested == [(("nyu-mll/glue", "mnli"), {"split": "validation_matched"})]
    assert ds.column_names == ["text_a", "text_b", "label", "idx"]
    assert ds.to_dict() == {"text_a": ["p0", "p1"], "text_b": ["h0", "h1"], "label": [2, 0], "idx": [0, 1]}
    assert ds.features["label"].dtype == "int64"


def test_load_split_hub_failure_suggests_data_path(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DskdError, match="could not load GLUE task sst2 from the hub .*set data.path"):
        load_split(get_task("sst2"), None, "train")


# --- tokenization and collation --------------------------------------------------


@needs_glue
def test_tokenize_and_collate_single_sentence(bert_tokenizer):
    ds = load_split(get_task("sst2"), str(GLUE), "dev", limit=8)
    tokenized = tokenize_split(ds, bert_tokenizer, max_length=16)
    assert set(tokenized.column_names) == {"input_ids", "token_type_ids", "attention_mask", "label", "idx"}
    lengths = [len(ids) for ids in tokenized["input_ids"]]
    assert max(lengths) <= 16 and min(lengths) < max(lengths)  # truncated, not padded

    batch = collate(list(tokenized), bert_tokenizer)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "idx"}
    assert batch["input_ids"].shape == (8, max(lengths))
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == ds["label"]
    assert batch["idx"].tolist() == list(range(8))
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row, :length].all()
        assert not batch["attention_mask"][row, length:].any()
        assert (batch["input_ids"][row, length:] == bert_tokenizer.pad_token_id).all()
    # first token is [CLS]; first example starts with "it 's a charming"
    assert bert_tokenizer.convert_ids_to_tokens(batch["input_ids"][0, :3].tolist()) == ["[CLS]", "it", "'"]


@needs_glue
def test_tokenize_pair_task_has_segment_ids(bert_tokenizer):
    ds = load_split(get_task("mrpc"), str(GLUE / "MRPC"), "dev", limit=4)
    batch = collate(list(tokenize_split(ds, bert_tokenizer, max_length=128)), bert_tokenizer)
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    assert (batch["token_type_ids"] == 1).any(dim=1).all()  # every row has a second segment
    # padding positions are segment 0
    assert (batch["token_type_ids"][batch["attention_mask"] == 0] == 0).all()


def test_collate_regression_labels_are_float32(bert_tokenizer):
    features = [
        {"input_ids": [101, 7, 102], "attention_mask": [1, 1, 1], "label": 3.5, "idx": 4},
        {"input_ids": [101, 102], "attention_mask": [1, 1], "label": 0.25, "idx": 9},
    ]
    batch = collate(features, bert_tokenizer)  # [PAD] is 0
    assert batch["input_ids"].tolist() == [[101, 7, 102], [101, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert "token_type_ids" not in batch
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [3.5, 0.25]
    assert batch["idx"].tolist() == [4, 9]
