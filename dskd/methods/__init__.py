"""Methods as plugins. Importing this package registers every method: its loss terms (in
``dskd.losses``' registry) and its run-level hooks (``base.Method``). The training loop
imports the package and calls what is registered; it names no method.

One module per method that needs more than a basic term: ``codir``, ``rw_kd``, ``mate_kd``
(MATE-KD, the adversarial half of Combined-KD), ``glitter`` (+ ``glitter_pool``),
``universal_kd`` (+ ``universal_probes``), ``noisy_labels``, ``swa``, ``pro_kd`` and
``kronecker``. Adding one: docs/design.md, "Adding a method".
"""

from dskd.config import ExperimentConfig, load_config
from dskd.losses import validate_loss_terms
from dskd.methods import codir, glitter, kronecker, mate_kd, noisy_labels, pro_kd, rw_kd, swa, universal_kd  # noqa: F401
from dskd.methods.base import METHOD_REGISTRY, Method, enabled_methods, exported_state, register_method, run_outputs

__all__ = ["METHOD_REGISTRY", "Method", "enabled_methods", "exported_state", "load_experiment", "register_method",
           "run_outputs"]


def check_losses(cfg: ExperimentConfig, source: str) -> None:
    """The checks of an experiment that need the registries: every loss term against its class,
    then what methods require of the rest of the config."""
    validate_loss_terms(cfg.losses, source)
    glitter.check_config(cfg, source)


def load_experiment(path, overrides=()) -> ExperimentConfig:
    """``dskd.config.load_config`` plus the checks of every registered loss term and method:
    what every command loads an experiment with."""
    return load_config(path, overrides, checks=(check_losses,))
