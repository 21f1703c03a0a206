"""Reading an experiment: YAML into the schema's dataclasses, ``--set`` overrides, and the
messages that name the dotted key and the file on any wrong key or type."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Union

import yaml

from dskd.config.schema import ExperimentConfig
from dskd.config.paths import check_config_paths
from dskd.config.validation import check_job_kind, validate
from dskd.errors import DskdError



def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (nested dataclasses built)."""

    def wrong() -> DskdError:
        return DskdError(f"{source}: `{key}` must be {_type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise wrong()
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) == 1:
            return _convert(value, non_null[0], key, source)
        for candidate in non_null:
            try:
                return _convert(value, candidate, key, source)
            except DskdError:
                continue
        raise wrong()
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise wrong()
    if origin is list:
        if not isinstance(value, list):
            raise wrong()
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong()
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(v, val_tp, f"{key}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise wrong()
        return build_dataclass(tp, value, source, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong()
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML follows YAML 1.1, which reads `3e-5` (no dot) as a string.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise wrong()
        if not math.isfinite(number):  # .inf / .nan train to NaN weights and still say "completed"
            raise DskdError(f"{source}: `{key}` must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong()
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a schema bug, not user input


# Names other tools use for a key of ours (Hugging Face's TrainingArguments, most of them):
# suggested wherever the key they point to exists.
ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "train_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "warmup": "warmup_ratio", "logging_steps": "log_every", "eval_steps": "eval_every", "save_steps": "save_every",
    "save_total_limit": "keep_checkpoints", "max_seq_length": "max_length", "model_name_or_path": "path",
    "num_layers": "layers", "num_hidden_layers": "layers", "hidden_size": "hidden", "num_attention_heads": "heads",
    "intermediate_size": "intermediate",
}


def _suggest(key: str, known: list[str]) -> str | None:
    """The known key a typo most likely meant: another tool's name for it (learning_rate -> lr),
    a shared word prefix (lr_rate -> lr), else the closest spelling."""
    if ALIASES.get(key) in known:
        return ALIASES[key]
    head = key.split("_")[0]
    if head != key and head in known:
        return head
    same_head = [k for k in known if k.split("_")[0] == head]
    if len(same_head) == 1:
        return same_head[0]
    close = difflib.get_close_matches(key, known, n=1)
    return close[0] if close else None


def build_dataclass(cls: type, data: dict, source: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, naming the dotted key of any problem."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for raw_key, value in data.items():
        key = str(raw_key)
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            close = _suggest(key, list(fields))
            hint = f"; did you mean `{prefix + '.' if prefix else ''}{close}`?" if close else "."
            raise DskdError(
                f"{source}: unknown key `{dotted}`{hint} Known keys here: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _convert(value, hints[key], dotted, source)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        where = f"{prefix}." if prefix else ""
        raise DskdError(f"{source}: missing required key(s) {', '.join('`' + where + m + '`' for m in missing)}")
    return cls(**kwargs)


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last one silently, so half of an edited config would be ignored)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise DskdError(f"line {key_node.start_mark.line + 1}: key `{key}` is given twice in one mapping "
                                f"(first on line {seen[key]}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, flag: str, expected: str):
    """A YAML file as data, or one error naming the file: missing, a folder, not UTF-8, not
    YAML, a key given twice."""
    if path.is_dir():
        raise DskdError(f"{flag} {path} is a folder; pass {expected}")
    if not path.is_file():
        raise DskdError(f"config file {path} does not exist; pass {flag} with {expected}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DskdError(f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        "save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except DskdError as exc:
        raise DskdError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise DskdError(f"{path}: not valid YAML: {exc}") from None


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``--set a.b.c=value`` to the raw mapping; the value is parsed as YAML."""
    if "=" not in assignment:
        raise DskdError(f"--set {assignment!r}: expected key.sub=value, e.g. --set training.lr=3e-5")
    dotted, text = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise DskdError(f"--set {assignment!r}: empty key part in `{dotted}`")
    try:
        value = yaml.load(text, Loader=UniqueKeyLoader) if text.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DskdError(f"--set {assignment!r}: the value is not valid YAML ({problem}); quote strings, "
                        "e.g. --set 'data.path=\"a b\"'") from None
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise DskdError(f"--set {assignment!r}: `{part}` is not a mapping, cannot set `{dotted}`")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                checks: tuple[Callable[[ExperimentConfig, str], None], ...] = (),
                check_paths: bool | str = True) -> ExperimentConfig:
    """Read a YAML experiment (or the defaults when ``path`` is None), apply ``--set``s, validate.

    ``checks`` are run last with the config and its source name; higher layers pass the
    checks that need their registries (``dskd.methods.load_experiment`` passes the loss
    terms' and the methods'), so this layer imports none of them. ``check_paths``: that every model,
    tokenizer and data path exists (or is a hub name that can be loaded); ``"data"`` only the data
    paths (a command whose models come from flags); False checks a recipe whose inputs other
    commands have yet to write."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict = {}
    if path is not None:
        p = Path(path)
        loaded = read_yaml(p, "--config", "a YAML file such as configs/tiny.yaml")
        if loaded is not None and not isinstance(loaded, dict):
            raise DskdError(f"{p}: the top level must be a mapping of sections (data, teacher, ...)")
        raw = loaded or {}
    for assignment in overrides:
        apply_override(raw, assignment)
    if overrides:
        source = f"{source} (with --set)"
    cfg = build_dataclass(ExperimentConfig, raw, source)
    check_job_kind(raw, source)
    validate(cfg, source)
    for check in checks:
        check(cfg, source)
    if check_paths:  # last: a config wrong in itself says so before a path is looked up
        check_config_paths(cfg, source, models=check_paths != "data")
    return cfg


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: ExperimentConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
