"""Registries by name (the torchdistill pattern): a plugin class registers itself with a
decorator and becomes usable from YAML by that name. Loss terms and run-level methods each
keep one."""

from __future__ import annotations

from typing import Callable


def registrar(registry: dict, kind: str, attribute: str) -> Callable[[str], Callable[[type], type]]:
    """A ``@register(name)`` decorator that adds a class to ``registry`` under ``name`` (once)
    and records the name on the class as ``attribute``."""

    def register(name: str) -> Callable[[type], type]:
        def decorator(cls: type) -> type:
            if name in registry:
                raise ValueError(f"{kind} {name!r} is registered twice")
            registry[name] = cls
            setattr(cls, attribute, name)
            return cls

        return decorator

    return register
