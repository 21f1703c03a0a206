"""Checking a DeepSpeed JSON against what DeepSpeed itself accepts, with one message that
names the key.

DeepSpeed ignores top-level keys it does not know (a misspelled ``zero_optimisation`` silently
trains without ZeRO) and reports wrong types as a pydantic traceback or a ``TypeError`` from
deep inside ``deepspeed.initialize``. The known keys are not a hand-kept list: they are the
keys DeepSpeed's own config parser reads, recorded while it parses an empty config, so they
follow the installed DeepSpeed version.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path

from dskd.errors import DskdError

# Keys dskd fills itself (engine.load_ds_config), so any value there is ours, not the user's.
_FILLED = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}


class _Recorder(dict):
    """A dict that remembers every key it is asked about."""

    def __init__(self, data, seen: set):
        super().__init__(data)
        self.seen = seen

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)

    def keys(self):
        recorder = self

        class _Keys:
            def __contains__(self, key):
                return key in recorder

            def __iter__(self):
                return iter(dict.keys(recorder))

        return _Keys()


@functools.lru_cache(maxsize=1)
def known_top_level_keys() -> frozenset[str]:
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set = set()
    DeepSpeedConfig(_Recorder(dict(_FILLED), seen))
    return frozenset(k for k in seen if isinstance(k, str))


def _model_fields(title: str) -> list[str]:
    """The fields of the DeepSpeed pydantic model named ``title`` (for "did you mean")."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    pending = [DeepSpeedConfigModel]
    while pending:
        cls = pending.pop()
        if cls.__name__ == title:
            return list(cls.model_fields)
        pending.extend(cls.__subclasses__())
    return []


def _closest(key: str, known) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def check(ds: dict, file: Path) -> None:
    """Refuse a key DeepSpeed would ignore, a section of the wrong type, or a value DeepSpeed
    rejects; each top-level section is parsed on its own so the error names it."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    known = known_top_level_keys()
    for key, value in ds.items():
        if key not in known:
            raise DskdError(f"{file}: unknown DeepSpeed key `{key}`{_closest(key, known)} (DeepSpeed would ignore it "
                            "silently)")
        for flag in ("fp16", "bf16"):
            if key == flag and isinstance(value, dict) and not isinstance(value.get("enabled", False), bool):
                raise DskdError(f"{file}: `{flag}.enabled` must be true or false, got {value['enabled']!r}")
        try:
            DeepSpeedConfig({**_FILLED, key: value})
        except pydantic.ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join([key, *map(str, error["loc"])])
            if error["type"] == "extra_forbidden":
                raise DskdError(f"{file}: unknown DeepSpeed key `{where}`"
                                f"{_closest(str(error['loc'][-1]), _model_fields(exc.title))}") from None
            raise DskdError(f"{file}: `{where}`: {error['msg']}, got {error.get('input')!r}") from None
        except (TypeError, AttributeError, ValueError, AssertionError) as exc:
            if not isinstance(value, dict):
                raise DskdError(f"{file}: `{key}` must be a JSON object (e.g. {{\"enabled\": true}} or "
                                f"{{\"stage\": 2}}), got {value!r}") from None
            raise DskdError(f"{file}: DeepSpeed rejects `{key}`: {exc}") from None
