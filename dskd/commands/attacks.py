"""Black-box adversarial attacks on a text classifier, for ``dskd robustness``.

Two greedy attacks share one search. The attacked column (default the last: the hypothesis
of a pair task) is split on whitespace; each word's importance is the drop of the gold-label
probability when the word is deleted (leave-one-out, one batched call over the words with
letters; words without letters are never attacked; when the query budget cannot pay for the
ranking, words are taken in text order). Words are then tried in order of importance: every
perturbation of the word is scored in one batched call, the one that lowers the gold
probability most is kept (only if it lowers it), and the search stops when the prediction
flips, when another word would exceed the word budget (``max_words`` x words, at least one
word), or when the query budget is spent (``queries`` counts every text scored, the clean
prediction included). Only the alphabetic core of a word changes; surrounding punctuation and
the case pattern are kept, other columns never change.

* ``char_attack``: DeepWordBug-like character edits of the word: swap two adjacent inner
  letters, substitute one letter, delete one letter, insert one letter (one random edit of
  each kind per word, drawn from ``random.Random`` seeded by ``seed`` and the example's text,
  so a result does not depend on the order of examples).
* ``word_attack``: TextFooler-like word replacement by candidates from a callable, either
  ``word -> list[str]`` (``embedding_neighbours``: nearest whole-word tokens in the model's own
  input embeddings) or ``(words, index) -> list[str]`` (``mlm_candidates``: a masked LM's
  proposals in context, as in BAE/BERT-Attack).

Like TextAttack's recipes: greedy search over words ranked by importance (TextFooler ranks by
deletion as we do; TextAttack's DeepWordBug replaces the word by an unknown token instead),
DeepWordBug's four character edits, and a query-counted budget. Unlike them: TextFooler takes
substitutes from counter-fitted synonym embeddings and keeps them only under part-of-speech
and Universal Sentence Encoder similarity constraints, and both recipes skip stop words; we
have none of that, so a word substitute may change the meaning (the victim's own embedding
table is a cheaper, weaker proxy for synonyms). DeepWordBug also tries one random edit per
word where we score one of each kind. We do not use TextAttack itself: it downloads the
embeddings, the USE model and NLTK data at run time (dskd runs offline on cluster nodes) and
needs TensorFlow (its ``tensorflow`` extra) for the USE constraint, plus heavy dependencies
(flair, language_tool_python) for a single command.
"""

from __future__ import annotations

import inspect
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

CHAR_EDITS = ("swap", "substitute", "delete", "insert")
Candidates = Callable[[str], list] | Callable[[list, int], list]


@dataclass
class AttackResult:
    original: tuple[str, ...]
    perturbed: tuple[str, ...]
    label: int
    clean_pred: int
    adv_pred: int
    words_changed: int
    words_total: int
    queries: int
    edits: list[tuple[int, str, str, str]] = field(default_factory=list)

    @property
    def skipped(self) -> bool:
        """The clean prediction is already wrong: nothing to attack."""
        return self.clean_pred != self.label

    @property
    def succeeded(self) -> bool:
        return not self.skipped and self.adv_pred != self.label


class Predictor(Protocol):
    def __call__(self, examples: list[tuple[str, ...]]) -> np.ndarray:
        """Class probabilities, shape [len(examples), num_labels]."""


def split_word(word: str) -> tuple[str, str, str]:
    """(prefix, alphabetic core, suffix): the core runs from the first to the last ASCII letter."""
    letters = [i for i, c in enumerate(word) if c in string.ascii_letters]
    if not letters:
        return word, "", ""
    return word[:letters[0]], word[letters[0]:letters[-1] + 1], word[letters[-1] + 1:]


def match_case(new: str, old: str) -> str:
    if old.isupper() and len(old) > 1:
        return new.upper()
    if old[:1].isupper():
        return new[:1].upper() + new[1:].lower()
    return new.lower()


def char_edits(core: str, rng: random.Random) -> list[tuple[str, str]]:
    """One random edit of each kind of ``core``: [(new core, kind)], each differing from ``core``."""
    edits = []
    letters = string.ascii_uppercase if core.isupper() and len(core) > 1 else string.ascii_lowercase
    inner = [i for i in range(1, len(core) - 2) if core[i].isalpha() and core[i + 1].isalpha()
             and core[i] != core[i + 1]]
    if inner:  # swap two adjacent letters, first and last letters stay
        i = rng.choice(inner)
        edits.append((core[:i] + core[i + 1] + core[i] + core[i + 2:], "swap"))
    positions = [i for i, c in enumerate(core) if c.isalpha()]
    i = rng.choice(positions)
    new = rng.choice([c for c in letters if c.lower() != core[i].lower()])
    edits.append((core[:i] + new + core[i + 1:], "substitute"))
    if len(core) > 1:
        i = rng.choice(positions)
        edits.append((core[:i] + core[i + 1:], "delete"))
    i = rng.randrange(len(core) + 1)
    edits.append((core[:i] + rng.choice(letters) + core[i:], "insert"))
    return edits


def _check_budget(max_words: float, max_queries: int) -> None:
    if not 0 < max_words <= 1:
        raise ValueError(f"max_words must be a share of the words in (0, 1], got {max_words}")
    if max_queries < 1:
        raise ValueError(f"max_queries must be at least 1 (the clean prediction), got {max_queries}")


def _in_context(candidates: Candidates) -> bool:
    """Whether ``candidates`` takes (words, index) rather than one word."""
    if getattr(candidates, "in_context", None) is not None:
        return bool(candidates.in_context)
    try:
        signature = inspect.signature(candidates)
    except (TypeError, ValueError):  # some builtins have none: take them as word -> words
        return False
    params = [p for p in signature.parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(params) >= 2


def _attack(predict: Predictor, texts: tuple[str, ...], label: int, perturbations, *, max_words: float,
            max_queries: int, column: int) -> AttackResult:
    """The shared greedy search; ``perturbations(words, index)`` -> [(new word, kind)]."""
    _check_budget(max_words, max_queries)
    texts = tuple(texts)
    column = column % len(texts)
    words = texts[column].split()
    queries = 0

    def score(variants: list[list[str]]) -> np.ndarray:
        nonlocal queries
        queries += len(variants)
        examples = [texts[:column] + (" ".join(v),) + texts[column + 1:] for v in variants]
        return np.asarray(predict(examples), dtype=np.float64)

    clean = score([words])[0] if words else np.asarray(predict([texts]), dtype=np.float64)[0]
    queries = max(queries, 1)
    clean_pred = int(np.argmax(clean))

    def result(current: list[str], adv_pred: int, edits: list) -> AttackResult:
        perturbed = texts if not edits else texts[:column] + (" ".join(current),) + texts[column + 1:]
        changed = sum(a != b for a, b in zip(words, current))
        return AttackResult(texts, perturbed, label, clean_pred, adv_pred, changed, len(words), queries, edits)

    if clean_pred != label:
        return result(words, clean_pred, [])
    attackable = [i for i, w in enumerate(words) if split_word(w)[1]]
    if attackable and queries + len(attackable) <= max_queries:
        without = score([words[:i] + words[i + 1:] for i in attackable])[:, label]
        drop = clean[label] - without
        # most important first; ties keep text order (stable sort)
        attackable = [attackable[j] for j in np.argsort(-drop, kind="stable")]
    max_changed = max(1, int(max_words * len(words) + 1e-9))  # 0.29 * 100 is 28.999...
    current, gold, adv_pred, edits = list(words), clean[label], clean_pred, []
    for index in attackable:
        if len(edits) >= max_changed or adv_pred != label or queries >= max_queries:
            break
        options = perturbations(current, index)[:max_queries - queries]
        if not options:
            continue
        variants = [current[:index] + [new] + current[index + 1:] for new, _ in options]
        probs = score(variants)
        best = int(np.argmin(probs[:, label]))  # first of equals: deterministic
        if probs[best, label] < gold:
            new, kind = options[best]
            edits.append((index, current[index], new, kind))
            current, gold, adv_pred = variants[best], probs[best, label], int(np.argmax(probs[best]))
    return result(current, adv_pred, edits)


def char_attack(predict: Predictor, texts: tuple[str, ...], label: int, *, max_words: float = 0.2,
                max_queries: int = 500, seed: int = 0, column: int = -1) -> AttackResult:
    """Greedy character-level attack (swap/substitute/delete/insert one letter per changed word)."""
    key = "\x1f".join(texts)

    def perturbations(words: list[str], index: int) -> list[tuple[str, str]]:
        prefix, core, suffix = split_word(words[index])
        # str seeds are hashed with SHA-512 by random: stable across runs and processes
        rng = random.Random(f"{seed}\x1e{key}\x1e{index}")
        seen, out = {words[index]}, []
        for new_core, kind in char_edits(core, rng):
            new = prefix + new_core + suffix
            if new not in seen:
                seen.add(new)
                out.append((new, kind))
        return out

    return _attack(predict, texts, label, perturbations, max_words=max_words, max_queries=max_queries, column=column)


def word_attack(predict: Predictor, texts: tuple[str, ...], label: int, *, candidates: Candidates,
                max_words: float = 0.2, max_queries: int = 500, seed: int = 0, column: int = -1) -> AttackResult:
    """Greedy word-replacement attack; ``candidates`` is ``word -> [words]`` or ``(words, index) -> [words]``.

    The kind is told by an ``in_context`` attribute when the callable has one (the factories below
    set it), else by its number of required positional parameters. Substitutes that are not purely
    alphabetic, or equal the word, are dropped; the word's case and punctuation are put back.
    Candidates are tried in the order given and the search draws nothing at random, so ``seed`` is
    unused; it is accepted so that both attacks take the same arguments.
    """
    contextual = _in_context(candidates)

    def perturbations(words: list[str], index: int) -> list[tuple[str, str]]:
        prefix, core, suffix = split_word(words[index])
        proposed = candidates(words, index) if contextual else candidates(core.lower())
        seen, out = {words[index]}, []
        for substitute in proposed:
            if not substitute or not substitute.isalpha() or substitute.lower() == core.lower():
                continue
            new = prefix + match_case(substitute, core) + suffix
            if new not in seen:
                seen.add(new)
                out.append((new, "replace"))
        return out

    return _attack(predict, texts, label, perturbations, max_words=max_words, max_queries=max_queries, column=column)


def _whole_words(tokenizer) -> dict[str, int]:
    """Whole-word tokens of a vocabulary (word -> id): alphabetic, not special, not a continuation piece.

    WordPiece marks continuations (``##x``); byte-level BPE and SentencePiece mark word starts
    (``Ġx``, ``▁x``), so there only marked tokens are whole words (stored without the mark)."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens)
    marks = ("Ġ", "▁")
    marked = any(t[:1] in marks for t in vocab)
    words = {}
    for token, token_id in sorted(vocab.items(), key=lambda item: item[1]):
        if token in special:
            continue
        if marked:
            if token[:1] not in marks:
                continue
            token = token[1:]
        if token.isascii() and token.isalpha():
            words.setdefault(token, token_id)
    return words


def embedding_neighbours(model, tokenizer, k: int = 8) -> Callable[[str], list[str]]:
    """``word -> k`` nearest whole-word tokens by cosine in ``model``'s input embeddings (cached per word).

    A word that is not one whole-word token of the vocabulary has no neighbours."""
    import torch

    words = _whole_words(tokenizer)
    names = list(words)
    with torch.no_grad():
        embeddings = model.get_input_embeddings()
        weights = next(embeddings.parameters(), None)  # where the model is (the module may hold none itself)
        ids = torch.tensor([words[n] for n in names], device=weights.device if weights is not None else "cpu")
        # A factored table (KroneckerBERT's) has no weight matrix: look the rows up through the module.
        table = embeddings.weight[ids] if hasattr(embeddings, "weight") else embeddings(ids)
        table = torch.nn.functional.normalize(table.detach().float(), dim=-1).cpu().numpy()
    row = {name: i for i, name in enumerate(names)}
    cache: dict[str, list[str]] = {}

    def neighbours(word: str) -> list[str]:
        if word not in cache:
            key = word if word in row else word.lower()
            if key not in row:
                cache[word] = []
            else:
                similarity = table @ table[row[key]]
                order = np.argsort(-similarity, kind="stable")
                cache[word] = [names[i] for i in order if names[i].lower() != key.lower()][:k]
        return cache[word]

    neighbours.in_context = False
    return neighbours


def mlm_candidates(mlm_model, tokenizer, k: int = 8) -> Callable[[list, int], list[str]]:
    """``(words, index) -> k`` whole words a masked LM proposes for ``words[index]`` in its context.

    The alphabetic core of the word is replaced by the mask token (punctuation stays) and the top
    whole-word tokens at the mask are returned, the word itself excluded. These MLM calls are not
    counted as queries: they cost the attacker, not the victim."""
    import torch

    words_ids = _whole_words(tokenizer)
    allowed = torch.tensor(sorted(set(words_ids.values())))
    id_to_word = {i: w for w, i in words_ids.items()}
    mlm_model.eval()

    def candidates(words: list, index: int) -> list[str]:
        prefix, core, suffix = split_word(words[index])
        masked = list(words)
        masked[index] = prefix + tokenizer.mask_token + suffix
        encoded = tokenizer(" ".join(masked), return_tensors="pt", truncation=True)
        where = (encoded["input_ids"][0] == tokenizer.mask_token_id).nonzero()
        if len(where) == 0:  # the mask fell beyond the truncation
            return []
        with torch.no_grad():
            logits = mlm_model(**encoded).logits[0, where[0, 0]]
        order = torch.argsort(logits[allowed], descending=True, stable=True)
        out = []
        for i in order.tolist():
            word = id_to_word[int(allowed[i])]
            if word.lower() != core.lower():
                out.append(word)
            if len(out) == k:
                break
        return out

    candidates.in_context = True
    return candidates


def summarize(results: list[AttackResult]) -> dict:
    """Accuracies, success rate (over attacked), words changed (share, over succeeded), queries (over attacked)."""
    examples = len(results)
    attacked = [r for r in results if not r.skipped]
    succeeded = [r for r in attacked if r.succeeded]
    return {
        "examples": examples,
        "attacked": len(attacked),
        "skipped": examples - len(attacked),
        "clean_accuracy": len(attacked) / examples if examples else 0.0,
        "adversarial_accuracy": sum(r.adv_pred == r.label for r in results) / examples if examples else 0.0,
        "attack_success_rate": len(succeeded) / len(attacked) if attacked else 0.0,
        "mean_words_changed": (float(np.mean([r.words_changed / max(r.words_total, 1) for r in succeeded]))
                               if succeeded else 0.0),
        "mean_queries": float(np.mean([r.queries for r in attacked])) if attacked else 0.0,
    }
