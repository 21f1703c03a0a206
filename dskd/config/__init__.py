"""Configuration: the experiment schema, loaded from YAML and validated at load.

One YAML file describes an experiment. It is read into the dataclasses of ``schema``; every
unknown key, wrong type or inconsistent combination raises ``DskdError`` naming the
dotted key (``training.lr``) and the file, before anything runs. ``--set a.b=value``
overrides are applied to the raw mapping first, so they get the same checks.

Paths may start with ``pkg://`` to point at resources shipped inside the package
(the embedded SST-2 sample and the BERT vocabulary), so the default experiment needs
neither network nor extra files.
"""

from dskd.config.loading import apply_override, build_dataclass, dump_config, load_config, to_dict
from dskd.config.schema import (
    PACKAGE_RESOURCES, PROJECT_ROOT, ArchConfig, CorpusConfig, DataConfig, ExperimentConfig, KroneckerConfig, LabelNoiseConfig,
    PlateauConfig, StageConfig, StudentConfig, SwaConfig, TeacherConfig, TrainingConfig, resolve_path,
)
from dskd.config.paths import check_source
from dskd.config.validation import check_trained_teacher, validate

__all__ = [
    "PACKAGE_RESOURCES", "PROJECT_ROOT", "ArchConfig", "CorpusConfig", "DataConfig", "ExperimentConfig", "KroneckerConfig",
    "LabelNoiseConfig", "PlateauConfig", "StageConfig", "StudentConfig", "SwaConfig", "TeacherConfig",
    "TrainingConfig", "apply_override", "build_dataclass", "check_source", "check_trained_teacher", "dump_config",
    "load_config", "resolve_path", "to_dict", "validate",
]
