"""The adversarial attacks of ``dskd robustness`` (dskd/commands/attacks.py): on hand-made
bag-of-words predictors the greedy search is checked step by step (ranking, flips, budgets,
query counts, columns, edit kinds, determinism, skipping), ``summarize`` by hand, bad budgets
refused; on a tiny BERT built from a config, the embedding neighbours and real attack calls."""

from __future__ import annotations

import string
import zlib
from pathlib import Path

import numpy as np
import pytest

from dskd.commands.attacks import (
    AttackResult,
    char_attack,
    embedding_neighbours,
    mlm_candidates,
    summarize,
    word_attack,
)

VOCAB = Path(__file__).resolve().parents[1] / "dskd" / "resources" / "bert-base-uncased" / "vocab.txt"


class BagOfWords:
    """p(positive) = sigmoid(sum of word weights) over all columns; counts every text it scores."""

    def __init__(self, weights: dict[str, float], bias: float = 0.0):
        self.weights, self.bias, self.scored = weights, bias, 0

    def weight(self, word: str) -> float:
        return self.weights.get(word.strip(string.punctuation).lower(), 0.0)

    def __call__(self, examples):
        self.scored += len(examples)
        scores = np.array([self.bias + sum(self.weight(w) for text in ex for w in text.split()) for ex in examples])
        positive = 1 / (1 + np.exp(-scores))
        return np.stack([1 - positive, positive], axis=1)


class HashedWords(BagOfWords):
    """Every word (misspellings too) gets a fixed pseudo-random weight: many different edits win."""

    def weight(self, word: str) -> float:
        return (zlib.crc32(word.encode()) % 1000) / 500 - 1.0


def pred(predict, texts) -> int:
    return int(np.argmax(predict([texts])[0]))


def one_edit(old: str, new: str, kind: str) -> bool:
    """Whether ``new`` is ``old`` after exactly one edit of ``kind``."""
    if kind == "swap":
        diff = [i for i in range(len(old)) if len(new) == len(old) and old[i] != new[i]]
        return (len(diff) == 2 and diff[1] == diff[0] + 1 and old[diff[0]] == new[diff[1]]
                and old[diff[1]] == new[diff[0]] and new[diff[0]].isalpha() and new[diff[1]].isalpha())
    if kind == "substitute":
        return len(new) == len(old) and sum(a != b for a, b in zip(old, new)) == 1
    if kind == "delete":
        return len(new) == len(old) - 1 and any(old[:i] + old[i + 1:] == new for i in range(len(old)))
    if kind == "insert":
        return len(new) == len(old) + 1 and any(new[:i] + new[i + 1:] == old for i in range(len(new)))
    return False


SENTIMENT = {"good": 3.0, "great": 2.0, "fine": 1.0, "bad": -3.0, "poor": -2.0}
SYNONYMS = {"good": ["fine", "bad"], "great": ["poor", "fine"]}


def test_word_attack_replaces_the_most_important_word_and_flips_the_prediction():
    model = BagOfWords(SENTIMENT)
    texts = ("the movie was great and Good,",)
    result = word_attack(model, texts, 1, candidates=lambda w: SYNONYMS.get(w, []), max_words=0.5)
    # "good" (+3) matters more than "great" (+2), so it goes first although it comes last; of its
    # substitutes "bad" lowers p(positive) most: 2 - 3 = -1 < 0 flips; case and the comma are kept
    # (in text order, "great" -> "poor" would be kept first and the flip would take two words)
    assert result.perturbed == ("the movie was great and Bad,",)
    assert result.edits == [(5, "Good,", "Bad,", "replace")]
    assert (result.clean_pred, result.adv_pred, result.succeeded, result.skipped) == (1, 0, True, False)
    # 1 clean + 6 leave-one-out + 2 substitutes of "good"
    assert result.queries == 9 == model.scored
    assert pred(model, result.perturbed) == 0
    assert (result.words_changed, result.words_total) == (1, 6)


def test_word_budget_is_respected_and_counted_exactly():
    model = BagOfWords(SENTIMENT)
    texts = ("good good good great fine",)  # score 12: "fine" substitutes need 3+ changes to flip
    candidates = {"good": ["fine"], "great": ["fine"], "fine": ["poor"]}.get
    for share, allowed in ((0.2, 1), (0.4, 2), (0.1, 1), (0.6, 3)):
        result = word_attack(model, texts, 1, candidates=lambda w: candidates(w, []), max_words=share)
        assert result.words_changed == len(result.edits) == allowed
        assert not result.succeeded
        assert sum(a != b for a, b in zip(texts[0].split(), result.perturbed[0].split())) == allowed


def test_query_budget_is_respected_exactly():
    texts = ("the movie was good and great",)
    for budget in (1, 3, 5, 7, 8, 9, 50):
        model = BagOfWords(SENTIMENT)
        result = word_attack(model, texts, 1, candidates=lambda w: SYNONYMS.get(w, []), max_queries=budget)
        assert result.queries == model.scored <= budget
    # 5 < 1 + 6: no ranking, words in text order; "the", "movie", "was" have no candidates, "good"'s 2 flip it
    model = BagOfWords(SENTIMENT)
    result = word_attack(model, texts, 1, candidates=lambda w: SYNONYMS.get(w, []), max_queries=5)
    assert result.queries == 3 and result.succeeded
    # 8 = 1 + 6 + 1: only the first substitute of "good" ("fine": score 3 > 0) fits, no flip
    model = BagOfWords(SENTIMENT)
    result = word_attack(model, texts, 1, candidates=lambda w: SYNONYMS.get(w, []), max_queries=8)
    assert result.queries == 8 and result.edits == [(3, "good", "fine", "replace")] and not result.succeeded


def test_only_the_attacked_column_changes():
    model = BagOfWords(SENTIMENT)
    texts = ("a great premise", "a good hypothesis")
    last = word_attack(model, texts, 1, candidates=lambda w: SYNONYMS.get(w, []))
    assert last.perturbed == ("a great premise", "a bad hypothesis")  # 2 - 3 < 0
    assert last.succeeded and last.words_total == 3
    first = word_attack(model, texts, 1, candidates=lambda w: SYNONYMS.get(w, []), column=0, max_words=1.0)
    assert first.perturbed[1] == texts[1] and first.perturbed[0] != texts[0]


def test_char_attack_edits_are_single_declared_operations():
    kinds = set()
    for n, sentence in enumerate(["the quick brown fox jumps over the lazy dog", "Astonishing, BRILLIANT work!",
                                  "it is what it is", "an unusually long-winded review of a so-so film"]):
        for seed in range(5):
            model = HashedWords({})
            label = pred(model, (sentence,))
            model.scored = 0
            result = char_attack(model, (sentence,), label, max_words=1.0, seed=seed)
            assert result.queries == model.scored
            old_words, new_words = sentence.split(), result.perturbed[0].split()
            assert len(old_words) == len(new_words)
            for index, old, new, kind in result.edits:
                kinds.add(kind)
                assert kind in ("swap", "substitute", "delete", "insert")
                assert old == old_words[index] and new == new_words[index] and one_edit(old, new, kind), (old, new, kind)
            changed = [i for i, (a, b) in enumerate(zip(old_words, new_words)) if a != b]
            assert changed == sorted(i for i, *_ in result.edits) and result.words_changed == len(changed)
            assert pred(model, result.perturbed) == result.adv_pred
            assert result.succeeded == (result.adv_pred != label)
    assert kinds == {"swap", "substitute", "delete", "insert"}


def test_char_attack_breaks_a_keyword_and_keeps_punctuation():
    model = BagOfWords({"good": 3.0})
    result = char_attack(model, ("a (good) film",), 1)
    (index, old, new, _kind), = result.edits
    assert index == 1 and old == "(good)" and new.startswith("(") and new.endswith(")") and new != old
    # 3 leave-one-out, 3 edits: substitute, delete, insert (no swap: the inner letters "oo" are equal)
    assert result.queries == 1 + 3 + 3 == model.scored
    assert result.succeeded and pred(model, result.perturbed) == 0


def test_same_seed_same_result_other_seeds_differ():
    texts = ("premise stays", "a wonderfully good and heartfelt film")
    model = BagOfWords({"good": 3.0, "wonderfully": 1.0, "heartfelt": 1.0})
    runs = [char_attack(model, texts, 1, seed=seed, max_words=0.5) for seed in range(6)]
    again = [char_attack(model, texts, 1, seed=seed, max_words=0.5) for seed in range(6)]
    assert [r.perturbed for r in runs] == [r.perturbed for r in again]
    assert len({r.perturbed for r in runs}) > 1
    assert all(r.perturbed[0] == texts[0] for r in runs)


def test_a_misclassified_example_is_skipped_after_one_query():
    model = BagOfWords(SENTIMENT)
    for attack in (char_attack, lambda *a, **k: word_attack(*a, candidates=lambda w: ["bad"], **k)):
        result = attack(model, ("a bad film",), 1)
        assert result.skipped and not result.succeeded
        assert result.queries == 1 and result.perturbed == ("a bad film",) and result.edits == []
        assert result.adv_pred == result.clean_pred == 0


def test_summarize_by_hand():
    def r(label, clean, adv, changed, total, queries):
        return AttackResult(("x",), ("y",), label, clean, adv, changed, total, queries, [])

    results = [r(1, 1, 0, 1, 4, 10),   # succeeded, 1/4 of the words
               r(0, 0, 1, 3, 6, 20),   # succeeded, 1/2
               r(1, 1, 1, 2, 5, 30),   # attacked, held
               r(1, 0, 0, 0, 5, 1)]    # skipped
    assert summarize(results) == {
        "examples": 4, "attacked": 3, "skipped": 1, "clean_accuracy": 0.75, "adversarial_accuracy": 0.25,
        "attack_success_rate": pytest.approx(2 / 3), "mean_words_changed": pytest.approx(0.375),
        "mean_queries": pytest.approx(20.0)}
    assert summarize([])["examples"] == 0


@pytest.mark.parametrize("kwargs, name", [({"max_words": 0}, "max_words"), ({"max_words": -0.1}, "max_words"),
                                          ({"max_words": 1.5}, "max_words"), ({"max_queries": 0}, "max_queries")])
def test_bad_budgets_are_refused(kwargs, name):
    model = BagOfWords(SENTIMENT)
    with pytest.raises(ValueError, match=name):
        char_attack(model, ("good",), 1, **kwargs)
    with pytest.raises(ValueError, match=name):
        word_attack(model, ("good",), 1, candidates=lambda w: [], **kwargs)
    assert model.scored == 0


@pytest.fixture(scope="module")
def tiny_bert():
    import torch
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertForSequenceClassification,
        BertTokenizer,
    )

    tokenizer = BertTokenizer(str(VOCAB))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    classifier = BertForSequenceClassification(config).eval()
    masked_lm = BertForMaskedLM(config).eval()
    return tokenizer, classifier, masked_lm


def test_embedding_neighbours_are_whole_words_by_cosine(tiny_bert):
    import torch

    tokenizer, model, _ = tiny_bert
    vocab = tokenizer.get_vocab()
    table = model.get_input_embeddings().weight
    with torch.no_grad():  # "awful" points exactly along "good": cosine 1, the nearest of all
        table[vocab["awful"]] = 3 * table[vocab["good"]]
    neighbours = embedding_neighbours(model, tokenizer, k=6)
    found = neighbours("good")
    assert found[0] == "awful" and len(found) == 6 and "good" not in found
    assert all(w.isascii() and w.isalpha() and w not in tokenizer.all_special_tokens for w in found)
    assert neighbours("Good") == found and neighbours("good") is neighbours("good")  # cached
    assert embedding_neighbours(model, tokenizer, k=6)("good") == found
    assert neighbours("qzxqzxqzx") == []
    # the rest by brute force over the whole-word tokens
    whole = [t for t in vocab if t.isascii() and t.isalpha() and t != "good"]
    ids = torch.tensor([vocab[t] for t in whole])
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(table[ids], table[vocab["good"]][None], dim=-1)
    assert set(found[1:]) == {whole[i] for i in torch.topk(cosine, 6).indices[1:].tolist()}


def test_a_factored_embedding_without_a_weight_matrix_gives_the_same_neighbours(tiny_bert):
    import torch

    tokenizer, model, _ = tiny_bert
    table = model.get_input_embeddings()

    class Factored(torch.nn.Module):  # like KroneckerBERT's: rows computed, no `weight`
        def forward(self, ids):
            return table(ids) * 1.0

    class Wrapped:
        def get_input_embeddings(self):
            return Factored()

    assert embedding_neighbours(Wrapped(), tokenizer, k=5)("good") == embedding_neighbours(model, tokenizer, k=5)("good")


def test_real_attacks_on_a_tiny_bert(tiny_bert):
    import torch

    tokenizer, model, masked_lm = tiny_bert

    def predict(examples):
        columns = list(zip(*examples))
        encoded = tokenizer(*columns, padding=True, return_tensors="pt")
        with torch.no_grad():
            return torch.softmax(model(**encoded).logits, dim=-1).numpy()

    pairs = [("a man is playing a guitar", "someone plays an instrument on the stage"),
             ("the cat sat on the mat", "an animal is resting quietly")]
    neighbours = embedding_neighbours(model, tokenizer, k=4)
    in_context = mlm_candidates(masked_lm, tokenizer, k=4)
    proposals = in_context(pairs[0][1].split(), 2)
    assert len(proposals) == 4 and "plays" not in proposals and all(w.isalpha() for w in proposals)
    for texts in pairs:
        label = pred(predict, texts)
        for result in (word_attack(predict, texts, label, candidates=neighbours, max_words=0.5, max_queries=40),
                       word_attack(predict, texts, label, candidates=in_context, max_words=0.5, max_queries=40),
                       char_attack(predict, texts, label, max_words=0.5, max_queries=40)):
            assert result.perturbed[0] == texts[0] and not result.skipped
            assert result.queries <= 40 and result.words_changed <= max(1, int(0.5 * result.words_total))
            assert pred(predict, result.perturbed) == result.adv_pred
            assert result.succeeded == (result.adv_pred != label)
            # each kept edit lowered the gold probability
            if result.edits:
                assert predict([result.perturbed])[0, label] < predict([texts])[0, label]
