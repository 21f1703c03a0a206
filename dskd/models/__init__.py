"""Teacher and student models (``loading``: tokenizers, models, the frozen teacher; ``students``:
the student and its layer map; ``capture``: forward hooks on Q/K; ``families``: what each encoder
family keeps where, and which attention terms it serves; ``kronecker``: KroneckerBERT).

The teacher is loaded (or built from config), frozen (``eval()``, no gradients), cast
to the run's dtype and kept outside the DeepSpeed engine: it never enters DDP, ZeRO
partitioning or optimizer state. The student is built from config or initialised from
chosen teacher layers (embeddings and head copied too).
"""

from dskd.models.loading import (
    resolve_model_path, model_source, load_tokenizer, arch_config, build_from_arch, pretrained_config, load_pretrained,
    freeze, teacher_outputs, model_inputs, register_model_types, mlm_head, SEQUENCE_CLASSIFIER,
)
from dskd.models.students import (
    every_kth_layer, resolve_layer_map, copied_layers, student_layer_plan, student_from_teacher,
    safetensors_files, student_from_teacher_files, build_student, student_from_folder,
)

__all__ = [
    "SEQUENCE_CLASSIFIER", "arch_config", "build_from_arch", "build_student", "copied_layers", "every_kth_layer", "freeze", "load_pretrained",
    "load_tokenizer", "mlm_head", "model_inputs", "model_source", "pretrained_config", "register_model_types", "resolve_layer_map",
    "resolve_model_path", "safetensors_files", "student_from_teacher", "student_from_folder", "student_from_teacher_files",
    "student_layer_plan", "teacher_outputs",
]
