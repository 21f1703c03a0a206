import pytest
import torch

from dskd import models
from dskd.config import ArchConfig, StudentConfig, TeacherConfig
from dskd.errors import DskdError

from conftest import BERT_VOCAB


def tiny_teacher(layers=6, model_type="bert"):
    arch = ArchConfig(layers=layers, hidden=32, heads=4, intermediate=64, model_type=model_type)
    return models.build_from_arch(arch, vocab_size=120, num_labels=2, pad_token_id=1, seed=0, key="teacher.arch")


def test_every_kth_layer():
    assert models.every_kth_layer(12, 6) == [2, 4, 6, 8, 10, 12]
    assert models.every_kth_layer(6, 3) == [2, 4, 6]
    assert models.every_kth_layer(6, 2) == [3, 6]
    assert models.every_kth_layer(24, 4) == [6, 12, 18, 24]
    with pytest.raises(DskdError, match=r"`student.layers` is 7, .* 1 to 6 layers"):
        models.every_kth_layer(6, 7)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_student_copies_chosen_teacher_layers_embeddings_and_head(model_type):
    teacher = tiny_teacher(model_type=model_type)
    student, layers = models.build_student(StudentConfig(teacher_layers=[1, 4, 6]), teacher, 2, 1, 0)
    assert layers == [1, 4, 6] and student.config.num_hidden_layers == 3
    t, s = teacher.state_dict(), student.state_dict()
    prefix = f"{teacher.base_model_prefix}.encoder.layer."
    for s_idx, t_layer in enumerate(layers):
        for key in (k for k in s if k.startswith(f"{prefix}{s_idx}.")):
            torch.testing.assert_close(s[key], t[key.replace(f"{prefix}{s_idx}.", f"{prefix}{t_layer - 1}.", 1)])
    for key in s:
        if not key.startswith(prefix):
            torch.testing.assert_close(s[key], t[key])  # embeddings, pooler, classifier


def test_student_layer_out_of_range_is_named():
    with pytest.raises(DskdError, match=r"`student.teacher_layers\[1\]` is 7, out of range: the teacher has 6 layers"):
        models.build_student(StudentConfig(teacher_layers=[2, 7]), tiny_teacher(), 2, 1, 0)


def test_student_built_from_arch_is_deterministic_in_seed():
    cfg = StudentConfig(init_from_teacher=False, arch=ArchConfig(layers=1, hidden=16, heads=2, intermediate=32))
    a, _ = models.build_student(cfg, tiny_teacher(), 2, 1, seed=3)
    b, _ = models.build_student(cfg, tiny_teacher(), 2, 1, seed=3)
    assert a.config.hidden_size == 16 and a.config.vocab_size == 120
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(va, vb, msg=ka)


def test_arch_heads_must_divide_hidden():
    with pytest.raises(DskdError, match=r"`teacher.arch.hidden` \(30\) must be divisible by `teacher.arch.heads` \(4\)"):
        models.build_from_arch(ArchConfig(2, 30, 4, 64), 100, 2, 0, 0, "teacher.arch")


def test_frozen_teacher_is_eval_without_grad_in_run_dtype():
    teacher = models.freeze(tiny_teacher(), torch.bfloat16, torch.device("cpu"))
    assert not teacher.training
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in teacher.parameters())
    batch = {"input_ids": torch.randint(0, 120, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    out = models.teacher_outputs(teacher, batch, frozenset({"logits"}))
    assert set(out) == {"logits"} and not out["logits"].requires_grad
    out = models.teacher_outputs(teacher, batch, frozenset({"logits", "cls"}), layers=[2, 6])
    assert set(out) == {"logits", "cls"} and len(out["cls"]) == 2
    full = teacher(**batch, output_hidden_states=True).hidden_states  # embeddings + 6 layers
    assert torch.equal(out["cls"][0], full[2][:, 0]) and torch.equal(out["cls"][1], full[6][:, 0])


def test_tokenizer_from_vocab_file_has_full_vocabulary():
    tok = models.load_tokenizer(TeacherConfig(arch=None, tokenizer=str(BERT_VOCAB)))
    assert len(tok) == 30522
    assert tok("hello world")["input_ids"] == [101, 7592, 2088, 102]
    with pytest.raises(DskdError, match=r"`teacher.tokenizer` points to /no/such/vocab.txt, which does not exist"):
        models.load_tokenizer(TeacherConfig(tokenizer="/no/such/vocab.txt"))


def test_a_fine_tuned_models_new_head_is_deterministic_in_seed_and_the_loaded_body_is_untouched(tmp_path):
    """dskd finetune of the same folder with the same seed starts from the same head (it did not: every
    teacher fine-tuned again differed), and the seed does not leak into the caller's random stream."""
    tiny_teacher().save_pretrained(tmp_path / "t2")
    torch.manual_seed(123)
    a, b, c = (models.load_pretrained(str(tmp_path / "t2"), 3, for_finetune=True, seed=s) for s in (5, 5, 6))
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1))
    assert a.classifier.weight.shape == (3, 32)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert torch.equal(a.bert.encoder.layer[0].attention.self.query.weight,
                       c.bert.encoder.layer[0].attention.self.query.weight)


def test_distill_teacher_needs_a_trained_head(tmp_path):
    body = tiny_teacher()
    body.save_pretrained(tmp_path / "t3")
    with pytest.raises(DskdError, match=r"has 2 output labels but the task has 3"):
        models.load_pretrained(str(tmp_path / "t3"), 3, for_finetune=False)
    with pytest.raises(DskdError, match=r"`teacher.path` points to /nope, which does not exist"):
        models.load_pretrained("/nope", 2, for_finetune=False)
