"""Methods as plugins. Importing this package registers every method: its loss terms (in
``dskd.losses``' registry) and its run-level hooks (``base.Method``). The training loop
imports the package and calls what is registered; it names no method.

One module per method that needs more than a basic term: ``codir``, ``rw_kd``, ``mate_kd``
(MATE-KD, the adversarial half of Combined-KD), ``glitter`` (+ ``glitter_pool``),
``universal_kd`` (+ ``universal_probes``), ``noisy_labels``, ``swa``, ``pro_kd``,
``kronecker``, and ``logit_mse``, the worked example of docs/design.md ("Adding a method").
Every module here is imported when the package is: adding a method is adding a file.
"""

import importlib
import pkgutil

from dskd.config import ExperimentConfig, load_config
from dskd.losses import check_unlabeled_rows, validate_loss_terms
from dskd.methods.base import METHOD_REGISTRY, Method, enabled_methods, exported_state, register_method, run_outputs

# Every module of this package is imported, so it registers itself: a new method is a new file.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["METHOD_REGISTRY", "Method", "enabled_methods", "exported_state", "load_experiment", "register_method",
           "run_outputs"]


def check_losses(cfg: ExperimentConfig, source: str) -> None:
    """The checks of an experiment that need the registries: every loss term against its class,
    then what methods require of the rest of the config."""
    validate_loss_terms(cfg.losses, source)
    check_unlabeled_rows(cfg, source)
    for method in METHOD_REGISTRY.values():
        method.check_config(cfg, source)


def load_experiment(path, overrides=(), check_paths: bool | str = True) -> ExperimentConfig:
    """``dskd.config.load_config`` plus the checks of every registered loss term and method:
    what every command loads an experiment with."""
    return load_config(path, overrides, checks=(check_losses,), check_paths=check_paths)
