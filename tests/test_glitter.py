"""Glitter: EDA operations, the candidate pool (deterministic, order-independent, stored and
reloaded, refused when altered or made from other data), stable cache keys of the candidates
(order, batch size, world size 1 vs 2), top-k selection and the loss by hand, the student's
forward on the candidates inside the module, config checks, the masked-LM path, and real
runs (augment -> cache-teacher -> distill, exact resume, 2 ranks under ZeRO-3, refusals)."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import BERT_VOCAB, run_dskd, write_config
from dskd.teacher import cache, cache_reader
from dskd.methods import glitter, glitter_pool
from dskd.errors import DskdError
from dskd.losses import build_loss_terms

SENTENCE = "the quick brown fox jumps over the lazy dog again"


def _tokenizer():
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab=str(BERT_VOCAB))


# ------------------------------------------------------------------------ EDA


@pytest.mark.parametrize("op", glitter_pool.EDA_OPS)
def test_eda_operations_are_deterministic_and_valid(op):
    words = SENTENCE.split()
    made = [glitter_pool.eda(SENTENCE, op, np.random.default_rng([3, k]), 0.2) for k in range(20)]
    again = [glitter_pool.eda(SENTENCE, op, np.random.default_rng([3, k]), 0.2) for k in range(20)]
    assert made == again  # the same stream gives the same variant
    assert len(set(made)) > 5  # and different streams different ones
    for text in made:
        out = text.split()
        assert out and text != SENTENCE or op == "swap"
        if op == "delete":  # an order-preserving subsequence, at least one word gone
            it = iter(words)
            assert all(w in it for w in out) and 1 <= len(words) - len(out) < len(words)
        elif op == "swap":  # a permutation
            assert Counter(out) == Counter(words)
        else:  # round(0.2 * 10) = 2 copies of the sentence's own words
            assert len(out) == len(words) + 2 and not (Counter(words) - Counter(out))
            assert set(out) <= set(words)


def test_eda_edge_cases_keep_a_valid_sentence():
    rng = np.random.default_rng(0)
    for op in glitter_pool.EDA_OPS:
        assert glitter_pool.eda("", op, rng, 0.1) == ""
    assert glitter_pool.eda("word", "delete", rng, 0.9) == "word"  # never empties a sentence
    assert glitter_pool.eda("word", "swap", rng, 0.1) == "word"
    assert glitter_pool.eda("word", "insert", rng, 0.1) == "word word"
    assert len(glitter_pool.eda("a b", "delete", rng, 0.99).split()) == 1
    with pytest.raises(ValueError, match="unknown EDA operation 'synonym'"):
        glitter_pool.eda("a b", "synonym", rng, 0.1)


def test_candidates_cycle_the_operations_with_their_own_stream_per_column():
    texts = {"text_a": SENTENCE, "text_b": "a second sentence of the pair here"}
    made = glitter_pool.eda_candidates(texts, idx=5, n=7, seed=1, ops=glitter_pool.EDA_OPS, alpha=0.2)
    assert [op for op, _ in made] == ["delete", "swap", "insert", "delete", "swap", "insert", "delete"]
    assert made == glitter_pool.eda_candidates(texts, idx=5, n=7, seed=1, ops=glitter_pool.EDA_OPS, alpha=0.2)
    assert made != glitter_pool.eda_candidates(texts, idx=5, n=7, seed=2, ops=glitter_pool.EDA_OPS, alpha=0.2)
    assert made != glitter_pool.eda_candidates(texts, idx=6, n=7, seed=1, ops=glitter_pool.EDA_OPS, alpha=0.2)
    # Candidate j does not depend on how many are generated.
    assert made[:3] == glitter_pool.eda_candidates(texts, idx=5, n=3, seed=1, ops=glitter_pool.EDA_OPS, alpha=0.2)


# ------------------------------------------------------------------ the pool

RAW = {"text_a": ["a good movie indeed", "bad , really bad film", "neither here nor there at all", "fine",
                  "one more sentence for the road"],
       "label": [1, 0, 0, 1, 1], "idx": [0, 1, 2, 3, 4]}


def _raw(order=None):
    ds = datasets.Dataset.from_dict(RAW, features=datasets.Features({
        "text_a": datasets.Value("string"), "label": datasets.Value("int64"), "idx": datasets.Value("int64")}))
    return ds.select(order).flatten_indices() if order is not None else ds


def _pool(raw, n=4, seed=0):
    return glitter_pool.build_pool(raw, n, lambda texts, idx: glitter_pool.eda_candidates(texts, idx, n, seed,
                                                                                glitter_pool.EDA_OPS, 0.2))


def _save(folder, pool, raw, n=4, task="sst2"):
    manifest = {"format": glitter_pool.POOL_FORMAT, "version": glitter_pool.POOL_VERSION, "task": task, "candidates": n,
                "seed": 0, "method": "eda", "rows": len(pool), "fingerprint": cache.data_fingerprint(pool),
                "source": {"examples": len(raw), "hash": cache.data_fingerprint(raw)}}
    glitter_pool.save_pool(folder, pool, manifest)
    return glitter_pool.CandidatePool(folder)


def test_pool_rows_carry_stable_ids_and_do_not_depend_on_the_data_order(tmp_path):
    raw = _raw()
    pool = _pool(raw)
    assert len(pool) == 20 and pool.column_names == ["cid", "idx", "candidate", "op", "text_a", "label"]
    assert pool["cid"] == list(range(20))
    assert pool["cid"] == [i * 4 + j for i, j in zip(pool["idx"], pool["candidate"])]
    assert pool["label"] == [RAW["label"][i] for i in pool["idx"]]  # the original's label
    shuffled = _pool(_raw([3, 1, 4, 0, 2]))
    assert shuffled.to_list() == pool.to_list()
    assert _pool(raw, seed=1).to_list() != pool.to_list()


def test_pool_is_stored_and_reloads_and_an_altered_one_is_refused(tmp_path):
    raw = _raw()
    pool = _pool(raw)
    stored = _save(tmp_path / "pool", pool, raw)
    assert stored.n == 4 and stored.dataset().to_list() == pool.to_list()
    assert stored.fingerprint == {"examples": 20, "hash": cache.data_fingerprint(pool)}
    stored.check_source("sst2", {"examples": 5, "hash": cache.data_fingerprint(raw)})
    with pytest.raises(DskdError, match=r"generated from other training data \(task: pool sst2, run mrpc; "
                                        r"train examples: pool 5, run 4"):
        stored.check_source("mrpc", {"examples": 4, "hash": cache.data_fingerprint(raw)})
    # Another pool's rows under this manifest: refused by the content hash.
    _pool(raw, seed=9).save_to_disk(str(tmp_path / "other"))
    (tmp_path / "pool" / glitter_pool.CANDIDATES_DIR).rename(tmp_path / "old")
    (tmp_path / "other").rename(tmp_path / "pool" / glitter_pool.CANDIDATES_DIR)
    with pytest.raises(DskdError, match="differs from what its manifest records"):
        glitter_pool.CandidatePool(tmp_path / "pool").dataset()
    with pytest.raises(DskdError, match=r"`data.augment`: .* does not exist; write one with `dskd augment"):
        glitter_pool.CandidatePool(tmp_path / "missing")


def test_candidates_of_a_batch_are_gathered_original_by_original(tmp_path):
    raw = _raw()
    candidates = glitter_pool.Candidates(_save(tmp_path / "pool", _pool(raw), raw), _tokenizer(), 16)
    batch = candidates.batch(torch.tensor([3, 0]), _tokenizer(), "cpu")
    assert batch["idx"].tolist() == [12, 13, 14, 15, 0, 1, 2, 3]  # candidate ids
    assert batch["labels"].tolist() == [1, 1, 1, 1, 1, 1, 1, 1]
    text = candidates.pool.dataset()[13]["text_a"]
    ids = _tokenizer()(text)["input_ids"]
    assert batch["input_ids"][1, : len(ids)].tolist() == ids
    with pytest.raises(DskdError, match=r"has no candidates for training example\(s\) idx \[7\]"):
        candidates.batch(torch.tensor([1, 7]), _tokenizer(), "cpu")


def test_pair_tasks_get_both_texts_changed_and_collated_as_pairs(tmp_path):
    raw = datasets.Dataset.from_dict({"text_a": ["the first sentence here", "another premise of some length"],
                                      "text_b": ["a second one", "and its hypothesis"], "label": [0.5, 3.0],
                                      "idx": [0, 1]})
    pool = _pool(raw, n=3)
    assert pool.column_names == ["cid", "idx", "candidate", "op", "text_a", "text_b", "label"]
    assert pool["label"] == [0.5] * 3 + [3.0] * 3  # regression labels are kept as they are
    assert all(text != raw[i]["text_a"] for text, i in zip(pool["text_a"], pool["idx"]))
    candidates = glitter_pool.Candidates(_save(tmp_path / "pool", pool, raw, n=3, task="stsb"), _tokenizer(), 32)
    batch = candidates.batch(torch.tensor([1]), _tokenizer(), "cpu")
    assert batch["token_type_ids"].max() == 1 and batch["labels"].dtype == torch.float32


# ----------------------------------------------------- cache keys of candidates


class IdSum(nn.Module):
    """A 'teacher' whose logits are (sum of real token ids, token count): exact, and different
    for different candidates, so a row filed under the wrong key would show."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, input_ids, attention_mask, token_type_ids=None, output_hidden_states=False):
        mask = attention_mask.double()
        return {"logits": torch.stack([(input_ids * mask).sum(1), mask.sum(1)], 1).float() * self.scale}


def _write_cache(out, view, batch_size, tokenizer):
    from dskd.teacher.online import TeacherSide

    spec = cache.CacheSpec(("logits",), ())
    return cache.write(out, {"teacher": "t", "data": {}}, {"fields": ["logits"], "layers": [], "dtype": "float32",
                                                            "batch_size": batch_size}, {},
                       {glitter.SPLIT: view}, TeacherSide(IdSum()), spec, batch_size, tokenizer,
                       {"hidden_size": 4, "num_labels": 2, "num_attention_heads": 1}, False, log=lambda *a: None)


def _read(folder, cids):
    batch = {"idx": torch.tensor(cids), "attention_mask": torch.ones(len(cids), 1)}
    return cache_reader.TeacherCache(folder).outputs(batch, frozenset({"logits"}), (), glitter.SPLIT)["logits"]


def _write_two_ranks(out, view, batch_size, tokenizer, monkeypatch):
    """`cache.write` as two ranks would run it: rank 0 writes the pending file and its shard;
    inside its gather, rank 1 writes its shard; then rank 0 the manifest."""
    from dskd.runtime import dist

    who = {"rank": 0}
    monkeypatch.setattr(dist, "rank", lambda: who["rank"])
    monkeypatch.setattr(dist, "world_size", lambda: 2)

    def gather(out_list, obj):
        if who["rank"] == 0:
            who["rank"] = 1
            theirs = _write_cache(out, view, batch_size, tokenizer)["shards"]
            who["rank"] = 0
            out_list[:] = [obj, {split: shards[1] for split, shards in theirs.items()}]
        else:
            out_list[:] = [obj, obj]

    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    manifest = _write_cache(out, view, batch_size, tokenizer)
    monkeypatch.undo()
    return manifest


def test_candidate_cache_keys_do_not_depend_on_order_batch_size_or_world_size(tmp_path, monkeypatch):
    raw = _raw()
    tokenizer = _tokenizer()
    view = glitter_pool.Candidates(_save(tmp_path / "pool", _pool(raw), raw), tokenizer, 16).view
    shuffled = view.select(np.random.default_rng(0).permutation(len(view))).flatten_indices()
    _write_cache(tmp_path / "c1", view, 3, tokenizer)
    _write_cache(tmp_path / "c2", shuffled, 7, tokenizer)
    manifest = _write_two_ranks(tmp_path / "c3", shuffled, 2, tokenizer, monkeypatch)
    assert [s["examples"] for s in manifest["shards"][glitter.SPLIT]] == [10, 10]
    cids = np.random.default_rng(1).permutation(20).tolist()
    expected = torch.tensor([[float(sum(ids)), float(len(ids))] for ids in (view[c]["input_ids"] for c in cids)])
    assert view["idx"] == list(range(20))  # row c of the view is candidate c
    for folder in ("c1", "c2", "c3"):
        assert torch.equal(_read(tmp_path / folder, cids), expected), folder


# ----------------------------------------------------------- selection, loss


def _term(**spec):
    return build_loss_terms({"glitter": {"weight": 1.0, **spec}})["glitter"]


def test_top_k_selection_picks_the_candidates_furthest_from_the_teacher():
    # 2 originals x 4 candidates, 3 classes: the teacher is sure of class 0; the student's
    # candidates disagree by hand-chosen amounts.
    zt = torch.tensor([[4.0, 0.0, 0.0]]).repeat(8, 1)
    zs = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 5.0],
                       [0.0, 1.0, 0.0], [4.0, 0.0, 0.0], [0.0, 6.0, 0.0], [3.0, 0.0, 0.0]])
    term = _term(temperature=1.0, select=2)
    term({"logits": torch.zeros(2, 3), "augment": {"logits": zs}}, {"augment": {"logits": zt}}, None)
    kl = F.kl_div(F.log_softmax(zs, -1), F.softmax(zt, -1), reduction="none").sum(-1).reshape(2, 4)
    assert kl[0].argsort(descending=True)[:2].tolist() == [3, 1] and kl[1].argsort(descending=True)[:2].tolist() == [2, 0]
    assert sorted(term.last_selected[0].tolist()) == [1, 3] and sorted(term.last_selected[1].tolist()) == [0, 2]
    assert glitter.select_top(torch.tensor([[0.1, 0.5, 0.3, 0.9]]), 3).tolist() == [[3, 1, 2]]
    assert glitter.select_top(torch.tensor([[0.1, 0.5]]), 3).shape == (1, 2)  # k larger than n: all


def test_loss_equals_the_hand_computation_and_only_selected_candidates_get_gradient():
    g = torch.Generator().manual_seed(0)
    zs = (torch.randn(3 * 5, 4, generator=g, dtype=torch.float64) * 2).requires_grad_()
    zt = torch.randn(3 * 5, 4, generator=g, dtype=torch.float64) * 2
    term = _term(temperature=5.0, select=2)
    got = term({"logits": torch.zeros(3, 4), "augment": {"logits": zs}}, {"augment": {"logits": zt}}, None)
    t = 5.0
    kl = [float(F.kl_div(F.log_softmax(zs[r].detach() / t, -1), F.softmax(zt[r] / t, -1), reduction="sum")) for r in range(15)]
    by_hand = t * t * sum(sum(sorted(kl[5 * i: 5 * i + 5])[-2:]) for i in range(3)) / (3 * 2)
    assert got.item() == pytest.approx(by_hand, rel=1e-12)
    assert got.item() == pytest.approx(glitter.reference_loss(zs, zt, 3, t, 2).item(), rel=1e-12)
    assert term.extra_logs()["selected"].item() == pytest.approx(by_hand / (t * t), rel=1e-12)
    assert term.extra_logs()["candidates"].item() == pytest.approx(sum(kl) / 15, rel=1e-12)
    got.backward()
    touched = (zs.grad.abs().sum(-1) > 0).reshape(3, 5)
    assert touched.sum(1).tolist() == [2, 2, 2]
    assert torch.equal(touched.nonzero()[:, 1].reshape(3, 2).sort(1).values, term.last_selected.sort(1).values)


def test_regression_uses_the_squared_error_and_no_candidates_give_zero():
    zs, zt = torch.tensor([[1.0], [0.0], [3.0], [2.0]]), torch.tensor([[0.0], [0.0], [0.0], [0.0]])
    term = _term(select=1)
    got = term({"logits": torch.zeros(2, 1), "augment": {"logits": zs}}, {"augment": {"logits": zt}}, None)
    assert got.item() == pytest.approx((1.0 + 9.0) / 2)  # per original the larger error: 1, then 9
    assert term({"logits": torch.zeros(2, 1)}, {}, None).item() == 0.0  # evaluation / plateau batches


def test_the_module_runs_the_student_on_the_candidates_in_its_forward():
    from dskd.config import ArchConfig
    from dskd.models import build_from_arch
    from dskd.training.module import DistillationModule

    tokenizer = _tokenizer()
    model = build_from_arch(ArchConfig(layers=1, hidden=16, heads=2, intermediate=32, dropout=0.0), len(tokenizer),
                            3, 0, 1, "student.arch")
    terms = build_loss_terms({"glitter": {"weight": 0.5, "temperature": 2.0, "select": 1},
                              "hard_ce": {"weight": 0.5}})
    module = DistillationModule(model, terms, frozenset({"logits"}))
    enc = tokenizer(["a b c", "d e"], padding=True, return_tensors="pt")
    aug = tokenizer(["a c", "b a c", "d", "e e d"], padding=True, return_tensors="pt")
    batch = {**enc, "labels": torch.tensor([0, 2]), "idx": torch.tensor([0, 1]), "augment": dict(aug)}
    zt = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    total, values = module(batch, {"logits": torch.zeros(2, 3), "augment": {"logits": zt}},
                           {"glitter": 0.5, "hard_ce": 0.5})
    zs = model(**aug).logits
    assert values["glitter"].item() == pytest.approx(glitter.reference_loss(zs, zt, 2, 2.0, 1).item(), rel=1e-6)
    total.backward()
    assert model.classifier.weight.grad.abs().sum() > 0
    # Without glitter in the stage's weights, the candidates are not run.
    _, values = module(batch, {"logits": torch.zeros(2, 3)}, {"hard_ce": 1.0})
    assert "glitter" not in values


# ------------------------------------------------------------------- config


def test_config_ties_data_augment_to_a_term_that_reads_it(tmp_path):
    from dskd.methods import load_experiment

    glitter_losses = {"soft_kd": {"weight": 0.5}, "glitter": {"weight": 0.5}}
    cfg = write_config(tmp_path / "a.yaml", {"losses": glitter_losses})
    with pytest.raises(DskdError, match=r"`losses.glitter` distils on augmented candidates; set `data.augment`"):
        load_experiment(cfg)
    cfg = write_config(tmp_path / "b.yaml", {"data.augment": "pool"})
    with pytest.raises(DskdError, match=r"`data.augment` is set but no loss term reads augmented candidates"):
        load_experiment(cfg)
    cfg = write_config(tmp_path / "c.yaml", {"data.augment": "pool",
                                             "losses": {"glitter": {"weight": 1.0, "select": "two"}}})
    with pytest.raises(DskdError, match=r"`losses.glitter.select` must be an integer"):
        load_experiment(cfg)
    cfg = write_config(tmp_path / "d.yaml", {"data.augment": "pool", "losses": {"glitter": {"weight": 1.0,
                                                                                            "select": 0}}})
    with pytest.raises(DskdError, match=r"`losses.glitter`: select .* must be at least 1"):
        load_experiment(cfg)
    assert load_experiment(write_config(tmp_path / "e.yaml", {"data.augment": "pool", "losses": glitter_losses}))


def test_select_may_not_exceed_the_pool_candidates(tmp_path):
    from dskd.methods import load_experiment

    raw = _raw()
    _save(tmp_path / "pool", _pool(raw), raw)
    cfg = load_experiment(write_config(tmp_path / "a.yaml", {"data.augment": str(tmp_path / "pool"),
                                                         "losses": {"glitter": {"weight": 1.0, "select": 5}}}))
    term = _term(select=5)
    with pytest.raises(DskdError, match=r"`losses.glitter.select` is 5, but the pool `data.augment` has 4 candidates"):
        term.bind_run(cfg, "losses.glitter")
    _term(select=4).bind_run(cfg, "losses.glitter")


# --------------------------------------------------------------- masked LM


def _masked_lm(folder, seed=0):
    from transformers import BertConfig, BertForMaskedLM

    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_masked_lm_fill_in_is_deterministic_and_needs_a_masked_lm_head(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    (model, tokenizer), why = glitter_pool.load_mlm(str(_masked_lm(tmp_path / "mlm")))
    assert why is None
    texts = {"text_a": SENTENCE, "text_b": "short one"}
    made = glitter_pool.mlm_candidates(model, tokenizer, texts, 3, 4, 0, 0.3, 10)
    assert made == glitter_pool.mlm_candidates(model, tokenizer, texts, 3, 4, 0, 0.3, 10)
    assert made != glitter_pool.mlm_candidates(model, tokenizer, texts, 4, 4, 0, 0.3, 10)
    assert len(made) == 4 and all(op == "mlm" and set(v) == {"text_a", "text_b"} for op, v in made)
    for _, v in made:  # round(0.3 * 10 word pieces) = 3 replaced, the rest kept
        kept = Counter(v["text_a"].split()) & Counter(SENTENCE.split())
        assert sum(kept.values()) >= 4 and v["text_a"] != SENTENCE
    BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32)).save_pretrained(
        tmp_path / "classifier")
    found, why = glitter_pool.load_mlm(str(tmp_path / "classifier"))
    assert found is None and "has no masked-LM head weights" in why
    assert glitter_pool.load_mlm(None)[0] is None


def test_augment_refuses_mlm_without_a_head_and_falls_back_to_eda_on_auto(session_tmp):
    cfg = write_config(session_tmp / "gl-mlm.yaml", {"data.augment": "pool", "data.train_limit": 8,
                                                     "losses": {"glitter": {"weight": 1.0}}})
    proc = run_dskd(["augment", "--config", cfg, "--output", session_tmp / "gl-mlm", "--method", "mlm"], session_tmp)
    assert proc.returncode == 2 and "--method mlm fills in masks with the teacher's masked-LM head" in proc.stderr
    assert not (session_tmp / "gl-mlm").exists()
    proc = run_dskd(["augment", "--config", cfg, "--output", session_tmp / "gl-auto", "--candidates", "3"],
                    session_tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no masked-LM head" in proc.stderr and "EDA operations instead" in proc.stderr
    manifest = json.loads((session_tmp / "gl-auto" / "manifest.json").read_text())
    assert manifest["method"] == "eda" and manifest["requested_method"] == "auto" and manifest["rows"] == 24
    proc = run_dskd(["augment", "--config", cfg, "--output", session_tmp / "gl-auto"], session_tmp)
    assert proc.returncode == 2 and "already holds a candidate pool; pass --overwrite" in proc.stderr


# ---------------------------------------------------------------- real runs

GLITTER = {"hard_ce": {"weight": 0.5}, "soft_kd": {"weight": 0.5, "temperature": 2.0},
           "glitter": {"weight": 0.5, "temperature": 2.0, "select": 2}}


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDERR:\n{proc.stderr[-4000:]}"
    return proc


def _save_teacher(folder):
    """A tiny BERT classifier with large random weights (initializer_range 0.2): unlike a default
    random or briefly fine-tuned tiny model, its logits differ clearly between sentences."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, initializer_range=0.2,
                                             pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def real(session_tmp):
    """A tiny teacher, its pool of 4 candidates per example and a one-rank cache of train, dev
    and the candidates."""
    root = session_tmp / "glitter"
    root.mkdir()
    teacher = _save_teacher(root / "teacher")
    pool, store = root / "pool", root / "cache"
    cfg = write_config(root / "exp.yaml", {"data.augment": str(pool), "teacher": {"path": str(teacher)},
                                           "losses": GLITTER, "training.epochs": 1, "training.save_every": 4})
    _ok(run_dskd(["augment", "--config", cfg, "--output", pool, "--candidates", 4], root))
    _ok(run_dskd(["cache-teacher", "--config", cfg, "--output", store], root))
    return {"root": root, "cfg": cfg, "pool": pool, "cache": store}


def _weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def _losses(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if tag.startswith("train/loss")}


@pytest.mark.slow
def test_augment_cache_distill_and_resume_exactly(real):
    root, cfg = real["root"], real["cfg"]
    manifest = json.loads((real["cache"] / "manifest.json").read_text())
    assert manifest["shards"]["augment"][0]["examples"] == 256 * 4
    assert manifest["identity"]["data"]["augment"] == glitter_pool.CandidatePool(real["pool"]).fingerprint
    cached = ["--set", f"teacher.cache={real['cache']}"]
    full, split = root / "full", root / "split"
    proc = _ok(run_dskd(["distill", "--config", cfg, "--output", full, *cached], root))
    assert "no teacher model is loaded" in proc.stderr
    _ok(run_dskd(["distill", "--config", cfg, "--output", split, *cached, "--set", "training.halt_after_steps=6"],
                 root))
    _ok(run_dskd(["distill", "--config", cfg, "--output", split, *cached, "--resume"], root))
    a, b = _weights(full), _weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (full / "metrics.json").read_bytes() == (split / "metrics.json").read_bytes()
    losses = _losses(full)
    assert min(losses["train/loss/glitter"]) > 0
    assert all(s >= c for s, c in zip(losses["train/loss/glitter/selected"], losses["train/loss/glitter/candidates"]))


@pytest.mark.slow
def test_candidate_rows_of_a_two_rank_cache_match_the_one_rank_cache(real):
    root = real["root"]
    two = root / "cache-2"
    _ok(run_dskd(["cache-teacher", "--config", real["cfg"], "--output", two, "--batch-size", 5], root, nproc=2))
    cids = np.random.default_rng(0).permutation(256 * 4).tolist()
    one_rank, two_ranks = _read(real["cache"], cids), _read(two, cids)
    assert torch.allclose(one_rank, two_ranks, atol=1e-5, rtol=0)  # equal up to the padding's fp32 rounding
    assert one_rank.std(0).min() > 1e-2  # the candidates' logits differ: a misfiled row would show
    # And they are the teacher's logits of that very candidate.
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(root / "teacher").eval()
    candidates = glitter_pool.Candidates(glitter_pool.CandidatePool(real["pool"]), _tokenizer(), 32)
    for c in cids[:16]:
        row = candidates.view[c]
        with torch.no_grad():
            alone = teacher(input_ids=torch.tensor([row["input_ids"]]),
                            attention_mask=torch.tensor([row["attention_mask"]])).logits[0]
        assert torch.allclose(one_rank[cids.index(c)], alone, atol=1e-5), c


@pytest.mark.slow
def test_glitter_runs_on_two_ranks_under_zero3_with_the_online_teacher(real):
    root = real["root"]
    out = root / "zero3"
    proc = _ok(run_dskd(["distill", "--config", real["cfg"], "--output", out, "--deepspeed",
                         "ds_configs/zero3_fp32.json"], root, nproc=2))
    assert "no teacher model is loaded" not in proc.stderr
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert min(_losses(out)["train/loss/glitter"]) > 0


@pytest.mark.slow
def test_a_cache_of_another_pool_is_refused_and_runs_without_glitter_may_share_it(real, tmp_path):
    root = real["root"]
    other = root / "pool-seed1"
    _ok(run_dskd(["augment", "--config", real["cfg"], "--output", other, "--candidates", 4, "--seed", 1], root))
    proc = run_dskd(["distill", "--config", real["cfg"], "--output", tmp_path / "x", "--set",
                     f"data.augment={other}", "--set", f"teacher.cache={real['cache']}"], root)
    assert proc.returncode == 2 and "was written for a different run (data.augment.hash: cache" in proc.stderr
    assert not (tmp_path / "x").exists()
    plain = write_config(tmp_path / "plain.yaml", {"teacher": {"path": str(root / "teacher"),
                                                               "cache": str(real["cache"])},
                                                   "training.halt_after_steps": 1})
    _ok(run_dskd(["distill", "--config", plain, "--output", tmp_path / "plain"], root))
