"""Values that name a model or a tokenizer: a local path, or a Hugging Face hub name.

A value is checked here, before anything heavy is imported, so that a mistyped local path fails
at once with the key that holds it, instead of becoming a hub request that transformers retries
with back-off for most of a minute and then blames the network. Torch-free: only the standard
library and ``huggingface_hub.constants`` (no network client) are imported.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

from dskd.config.schema import resolve_path
from dskd.errors import DskdError

MODEL = "a model folder or a dskd run folder"
TOKENIZER = "a tokenizer folder, a vocab.txt or a sentencepiece .model file"
HUB_PROBE_SECONDS = 3.0


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it, but read now: tests and
    launchers set it after the library may have been imported."""
    from huggingface_hub.constants import ENV_VARS_TRUE_VALUES

    return any(os.environ.get(name, "").upper() in ENV_VARS_TRUE_VALUES
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_local(value: str) -> bool:
    """Written as a path: starts with `.`, `/`, `~` or a dskd scheme, or its parent folder exists
    (`runs/typo` next to an existing `runs/`). A bare `name` or `org/name` could be a hub name."""
    if value.startswith((".", "/", "~", "pkg://", "pypkg://")):
        return True
    parent = Path(value).parent
    return parent != Path(".") and parent.exists()


def is_hub_name(value: str) -> bool:
    """Whether ``value`` can be a hub repo id (`name` or `org/name`), by huggingface_hub's own rule."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def in_hub_cache(name: str) -> bool:
    """Whether a snapshot of model ``name`` has been downloaded to the local hub cache."""
    from huggingface_hub.constants import HF_HUB_CACHE, REPO_ID_SEPARATOR

    snapshots = Path(HF_HUB_CACHE) / f"models{REPO_ID_SEPARATOR}{name.replace('/', REPO_ID_SEPARATOR)}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def offline_message(name: str, key: str, what: str, why: str) -> str:
    return (f"{key} is {name}: no such local folder, and as a hub name it cannot be loaded because the hub is "
            f"offline ({why}); give a local folder ({what}), or download it where there is network "
            f"(hf download {name}) and point {key} at the copy")


def check_source(value: str, key: str, what: str = MODEL) -> None:
    """Fail at once, naming ``key``, unless ``value`` exists locally or is a hub name that can be
    loaded: one in the local cache, or one the hub can serve now (not HF_HUB_OFFLINE, and reachable).
    ``key`` is written as it should appear (`` `teacher.path` `` or ``--model``)."""
    try:
        path = Path(resolve_path(value)).expanduser()
    except DskdError as exc:  # pypkg:// of a package that is not installed
        raise DskdError(f"{key}: {exc}") from None
    if path.exists():
        return
    if looks_local(value) or not is_hub_name(value):
        shown = value if path == Path(value) else f"{value} ({path})"  # where ~ and pkg:// led
        raise DskdError(f"{key} points to {shown}, which does not exist; give {what}")
    if in_hub_cache(value):
        return
    if hub_offline():
        from huggingface_hub.constants import HF_HUB_CACHE

        raise DskdError(offline_message(value, key, what, f"HF_HUB_OFFLINE is set and {HF_HUB_CACHE} holds no copy"))
    why = hub_unreachable()
    if why is not None:
        raise DskdError(offline_message(value, key, what, why))


def check_config_paths(cfg, source: str, models: bool = True) -> None:
    """Every key of an experiment that names a model, a tokenizer or input data, checked before
    anything is loaded. Outputs of other dskd commands (`teacher.cache`, `data.augment`, probes) are
    left to the step that reads them: the config that writes them names them too. ``models=False``:
    the data keys only, for commands that take their models from flags (evaluate, robustness)."""

    def fail(message: str) -> None:
        raise DskdError(f"{source}: {message}")

    def check(value, key: str, what: str) -> None:
        if value is not None:
            try:
                check_source(value, f"`{key}`", what)
            except DskdError as exc:
                fail(str(exc))

    if models:
        check(cfg.teacher.path, "teacher.path", MODEL)
        check(cfg.teacher.tokenizer, "teacher.tokenizer", TOKENIZER)
        check(cfg.student.init, "student.init", MODEL)
        for i, stage in enumerate(cfg.schedule):
            if stage.teacher is not None and not stage.teacher.startswith("trajectory:"):  # Pro-KD resolves those
                check(stage.teacher, f"schedule[{i}].teacher", MODEL)
    data = cfg.data
    if data.corpus is None and data.path is not None:  # a string is always a folder; null loads from the hub
        folder = Path(resolve_path(data.path)).expanduser()
        if not folder.exists():
            fail(f"`data.path` points to {data.path}, which does not exist; give a GLUE-format folder (the GLUE "
                 "root or the task's folder), or null to load the task from the hub")
    if data.corpus is not None:
        for i, file in enumerate(data.corpus.files):
            if not Path(resolve_path(str(file))).expanduser().exists():
                fail(f"`data.corpus.files[{i}]` points to {file}, which does not exist; give .txt, .jsonl or "
                     ".parquet files or folders of them")


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """Why the hub cannot be reached (None: it can), from one short connection attempt, once per
    process: on a compute node without network, transformers would otherwise retry for most of a
    minute and then blame the connection. Behind a proxy (HTTPS_PROXY, ...) the proxy is what must answer."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    from huggingface_hub.constants import ENDPOINT

    url = urlsplit(ENDPOINT)
    proxy = getproxies().get(url.scheme)
    if proxy and not proxy_bypass(url.hostname or ""):
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as exc:
        return f"{url.hostname}:{port} cannot be reached: {exc.strerror or exc}"
    return None


def hub_kwargs(value: str, key: str, what: str = MODEL) -> dict:
    """``from_pretrained``'s keywords for a model or tokenizer ``value``: none for a local path or a
    reachable hub; the local cache only (``local_files_only``) for a hub name the hub cannot serve
    now; one offline message when it is not cached either."""
    if Path(value).expanduser().exists() or hub_offline():
        return {}
    why = hub_unreachable()
    if why is None:
        return {}
    if in_hub_cache(value):
        return {"local_files_only": True}
    raise DskdError(offline_message(value, key, what, why))
