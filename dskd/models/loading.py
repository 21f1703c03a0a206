"""Loading and building models: tokenizers, models from a folder, the hub or ``arch``, the
frozen teacher (``eval()``, no gradients, the run's dtype, outside the DeepSpeed engine), and
the inputs and outputs a forward pass takes and gives."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dskd.config import ArchConfig, TeacherConfig, resolve_path
from dskd.config.paths import MODEL, TOKENIZER, check_source, hub_kwargs, offline_message
from dskd.errors import DskdError
from dskd.models import families


def resolve_model_path(path: str) -> str:
    """A dskd run folder stands for the model it exported (``<run>/model``)."""
    p = Path(resolve_path(path))
    if (p / "model" / "config.json").is_file():
        return str(p / "model")
    return str(p)


def model_source(path: str, key: str, what: str = MODEL) -> tuple[str, dict]:
    """The folder or hub name ``path`` loads from and ``from_pretrained``'s keywords for it; a path that
    does not exist, or a hub name the hub cannot serve, fails here at once (``dskd.config.paths``)."""
    check_source(path, f"`{key}`", what)
    source = resolve_model_path(path)
    return source, hub_kwargs(source, f"`{key}`", what)


def _load_failure(exc: Exception, source: str, key: str, what: str, usual: str) -> str:
    """``usual``, or the offline message when a hub download failed on the network (transformers
    then says "check your internet connection", the wrong advice on a compute node)."""
    text = str(exc).strip()
    if not Path(source).exists() and any(word in text.lower() for word in ("connect", "offline")):
        return offline_message(source, f"`{key}`", what, text.splitlines()[0])
    return usual


def load_tokenizer(cfg: TeacherConfig, key: str | None = None):
    """The tokenizer of ``cfg`` (``teacher.tokenizer``, else ``teacher.path``), padding on the right:
    the capture hooks, the losses' masks and the teacher cache's packing read real tokens first."""
    tokenizer = _load_tokenizer(cfg, key)
    tokenizer.padding_side = "right"
    return tokenizer


# Bare vocabulary files (no tokenizer_config.json / tokenizer.json) -> the transformers class that
# reads them. WordPiece covers BERT, ELECTRA and DistilBERT; byte-level BPE RoBERTa; sentencepiece
# ALBERT (spiece.model) and DeBERTa-v2/v3 (spm.model).
BARE_VOCABULARIES = (
    (("vocab.txt",), "BertTokenizerFast"),
    (("vocab.json", "merges.txt"), "RobertaTokenizer"),
    (("spiece.model",), "AlbertTokenizer"),
    (("spm.model",), "DebertaV2Tokenizer"),
)
SENTENCEPIECE_FILES = ("spiece.model", "spm.model")


def _load_tokenizer(cfg: TeacherConfig, key: str | None):
    from transformers import AutoTokenizer

    key = key or ("teacher.tokenizer" if cfg.tokenizer else "teacher.path")
    source, hub = model_source(cfg.tokenizer or cfg.path, key, TOKENIZER if cfg.tokenizer else MODEL)
    p = Path(source)
    if p.is_file() and p.suffix in (".txt", ".model"):
        return _bare_tokenizer(p.parent, [p.name], "BertTokenizerFast" if p.suffix == ".txt" else
                               "DebertaV2Tokenizer" if p.name == "spm.model" else "AlbertTokenizer", key)
    if p.is_dir() and not any((p / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
        for files, cls in BARE_VOCABULARIES:
            if all((p / name).is_file() for name in files):
                return _bare_tokenizer(p, list(files), cls, key)
        raise DskdError(
            f"`{key}`: {source} holds no tokenizer: no tokenizer_config.json or tokenizer.json, and none of the bare "
            "vocabularies dskd reads (vocab.txt: WordPiece; vocab.json + merges.txt: byte-level BPE; spiece.model or "
            f"spm.model: sentencepiece). It holds: {', '.join(sorted(f.name for f in p.iterdir())[:8]) or 'nothing'}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **hub)
    except Exception as exc:  # transformers raises many types for a bad folder or hub name
        raise DskdError(_load_failure(exc, source, key, TOKENIZER, f"`{key}`: could not load a tokenizer from "
                                      f"{source}: {_tokenizer_failure(exc)}")) from None
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        # transformers builds a tokenizer of special tokens only when the config names a class
        # but the vocabulary file is missing; it would tokenise every word as unknown.
        raise DskdError(f"`{key}`: the tokenizer in {source} has no vocabulary ({len(tokenizer)} tokens, all special): "
                        "its vocabulary file is missing; add it (vocab.txt, vocab.json + merges.txt, a sentencepiece "
                        ".model or tokenizer.json) beside tokenizer_config.json")
    return tokenizer


def _bare_tokenizer(folder: Path, files: list[str], cls: str, key: str):
    """The tokenizer of a bare vocabulary: ``files`` (in ``folder``) read by transformers' ``cls``."""
    import transformers

    if files[0].endswith(".model") and not _sentencepiece_installed():
        raise DskdError(f"`{key}`: {folder / files[0]} is a sentencepiece model, and reading it needs the "
                        "`sentencepiece` package, which is not installed: pip install sentencepiece")
    try:
        if cls == "BertTokenizerFast":
            # transformers 5 ignores `vocab_file=`, giving a 5-token vocabulary; `vocab=` works.
            return transformers.BertTokenizerFast(vocab=str(folder / files[0]))
        tokenizer_class = getattr(transformers, cls)
        if files[0].endswith(".model"):  # under any file name (from_pretrained looks for its own name only)
            return tokenizer_class(**tokenizer_class.convert_to_native_format(vocab_file=str(folder / files[0])))
        return tokenizer_class.from_pretrained(str(folder))
    except Exception as exc:
        raise DskdError(f"`{key}`: could not read {', '.join(str(folder / f) for f in files)} as a {cls}: "
                        f"{_tokenizer_failure(exc)}") from None


def _sentencepiece_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("sentencepiece") is not None


def _tokenizer_failure(exc: Exception) -> str:
    """transformers' reason, unless it blames a missing sentencepiece that is installed: it says so
    whenever it finds no file it can build a fast tokenizer from."""
    text = str(exc).strip()
    if "sentencepiece" in text and _sentencepiece_installed():
        return ("transformers found no file to build a tokenizer from (no tokenizer.json, and no vocabulary its "
                "tokenizer_config.json names); give a folder with tokenizer.json, a vocab.txt, vocab.json + "
                "merges.txt, or a sentencepiece .model file")
    return text.splitlines()[0] if text else type(exc).__name__


def arch_config(arch: ArchConfig, vocab_size: int, num_labels: int, pad_token_id: int, key: str):
    """The Hugging Face config of a model built from ``arch``."""
    from transformers import AutoConfig

    if arch.hidden % arch.heads:
        raise DskdError(f"`{key}.hidden` ({arch.hidden}) must be divisible by `{key}.heads` ({arch.heads})")
    for name in ("layers", "hidden", "heads", "intermediate"):
        if getattr(arch, name) < 1:
            raise DskdError(f"`{key}.{name}` must be at least 1, got {getattr(arch, name)}")
    extra = {}
    max_position = arch.max_position
    if arch.model_type == "roberta":
        # RoBERTa's positions start after the padding index.
        max_position += pad_token_id + 1
        extra["type_vocab_size"] = 1
    generic = dict(
        vocab_size=vocab_size,
        hidden_size=arch.hidden,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        intermediate_size=arch.intermediate,
        max_position_embeddings=max_position,
        hidden_dropout_prob=arch.dropout,
        attention_probs_dropout_prob=arch.dropout,
        num_labels=num_labels,
        pad_token_id=pad_token_id,
        **extra,
    )
    return AutoConfig.for_model(arch.model_type, **families.arch_overrides(arch.model_type, arch, generic))


SEQUENCE_CLASSIFIER = "AutoModelForSequenceClassification"  # GLUE's model class (``TaskSpec.model_class``)


def build_from_arch(arch: ArchConfig, vocab_size: int, num_labels: int, pad_token_id: int, seed: int, key: str,
                    model_class: str = SEQUENCE_CLASSIFIER):
    """A randomly initialised model of the given shape and transformers Auto class (a sequence
    classifier unless told otherwise), deterministic in ``seed``."""
    import transformers

    config = arch_config(arch, vocab_size, num_labels, pad_token_id, key)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(transformers, model_class).from_config(config)


def pretrained_config(path: str, num_labels: int, key: str = "teacher.path"):
    """A model folder's config, checked against the task, without loading weights."""
    from transformers import AutoConfig

    register_model_types()

    source, hub = model_source(path, key, MODEL)
    try:
        config = AutoConfig.from_pretrained(source, **hub)
    except Exception as exc:
        raise DskdError(_load_failure(exc, source, key, MODEL,
                                      f"`{key}`: could not read a model config from {source}: {exc}")) from None
    families.check_loaded(config, key)
    if config.num_labels != num_labels:
        raise DskdError(
            f"`{key}` ({source}) has {config.num_labels} output labels but the task has {num_labels}; "
            "distil from a teacher fine-tuned on this task (dskd finetune --config ... --output DIR, then teacher.path: DIR)"
        )
    return config


def load_pretrained(path: str, num_labels: int, for_finetune: bool, key: str = "teacher.path",
                    model_class: str = SEQUENCE_CLASSIFIER, needed_by: str | None = None, seed: int = 0):
    """Load a model with the task's Auto class. A sequence classifier's head must already match
    the task unless ``for_finetune``; a masked-LM head must be in the weights when ``needed_by``
    (the loss term that reads it) is given. Weights the folder lacks (a fine-tuned model's new
    head) are initialised from ``seed``, so that fine-tuning the same folder twice gives the same model."""
    import transformers

    register_model_types()

    source, hub = model_source(path, key, MODEL)
    if model_class == SEQUENCE_CLASSIFIER and not for_finetune:
        pretrained_config(path, num_labels, key)
    kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": for_finetune} \
        if model_class == SEQUENCE_CLASSIFIER else {}
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, info = getattr(transformers, model_class).from_pretrained(source, output_loading_info=True,
                                                                             **kwargs, **hub)
    except Exception as exc:
        raise DskdError(_load_failure(exc, source, key, MODEL,
                                      f"`{key}`: could not load a model from {source}: {exc}")) from None
    families.check_loaded(model.config, key)
    missing = info.get("missing_keys", [])
    fresh = [k for k in missing if "classifier" in k or "score" in k]
    if model_class == SEQUENCE_CLASSIFIER and not for_finetune and fresh:
        raise DskdError(
            f"`{key}` ({source}) has no trained classification head ({', '.join(sorted(fresh))} newly "
            "initialised); fine-tune it first with `dskd finetune`"
        )
    fresh = [k for k in missing if k.startswith(("cls.", "lm_head."))]
    if needed_by is not None and fresh:
        raise DskdError(
            f"`{needed_by}` distils the teacher's masked-LM distribution, but `{key}` ({source}) has no masked-LM "
            f"head ({', '.join(sorted(fresh)[:3])} not in its weights); drop `{needed_by}` and distil with the "
            "representation terms (hidden_cosine, attention_kl, minilm, ...), or use a teacher with a head"
        )
    return model


def freeze(model: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype)


def teacher_outputs(teacher: nn.Module, batch: dict, needs: frozenset[str], capture=None, layers=()) -> dict:
    """Run the frozen teacher without autograd, asking only for what the losses need.

    ``layers``: the teacher layers (1-based, aligned with the student's active pairs)
    whose [CLS] vectors (``cls``) and Q/K (``attention_qk``, via ``capture``) are kept.
    """
    from dskd.models.capture import forward_with_layers

    with torch.no_grad():
        return forward_with_layers(teacher, model_inputs(batch), needs, capture, list(layers))


def model_inputs(batch: dict, model: nn.Module | None = None) -> dict:
    """The batch's model inputs; those ``model`` does not take (DistilBERT's token_type_ids) left out."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    return inputs if model is None else families.accepted_inputs(model, inputs)


# ------------------------------------------------------------------------ students


def register_model_types() -> None:
    """Register dskd's own model classes (KroneckerBERT) with transformers' Auto classes, so
    that a folder whose config names them loads like any other."""
    import dskd.models.kronecker  # noqa: F401  (registers on import)


def mlm_head(model: nn.Module, who: str):
    """(transform, decoder weight, decoder bias) of a masked-LM head: the dense + GELU + LayerNorm
    applied before the vocabulary projection, and that projection (tied to the word embeddings),
    which the masked-LM terms apply themselves, chunked and at masked positions only."""
    predictions = getattr(getattr(model, "cls", None), "predictions", None)
    if predictions is not None and hasattr(predictions, "transform"):  # BERT
        transform = predictions.transform
    elif all(hasattr(getattr(model, "lm_head", None), name) for name in ("dense", "layer_norm")):  # RoBERTa
        head = model.lm_head

        def transform(x):
            return head.layer_norm(nn.functional.gelu(head.dense(x)))
    else:
        raise DskdError(f"the {who} ({type(model).__name__}) has no BERT- or RoBERTa-style masked-LM head "
                        "(cls.predictions or lm_head)")
    decoder = model.get_output_embeddings()
    return transform, decoder.weight, decoder.bias
