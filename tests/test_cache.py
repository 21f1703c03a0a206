"""The teacher cache: written once by `dskd cache-teacher`, read by `dskd distill`.

The end-to-end runs use MRPC with max_length 24: every MRPC example is longer than 24
tokens, so every batch has the same shape and the teacher's numbers for an example do
not depend on which batch it was in (they do, at fp32 rounding, when padding lengths
differ). That makes "a cached run equals an online run" checkable bit for bit.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import BERT_VOCAB, require_shared, run_dskd, write_config
from dskd.teacher import cache, cache_reader

pytestmark = pytest.mark.slow

LOSSES = {"attention_kl": {"weight": 1.0}, "cls_cosine": {"weight": 1.0},
          "soft_kd": {"weight": 0.5, "temperature": 2.0}, "hard_ce": {"weight": 0.5}}


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    return proc


def _fails(proc, *needles):
    assert proc.returncode == 2, f"exit {proc.returncode}\nSTDERR:\n{proc.stderr[-3000:]}"
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in:\n{proc.stderr[-3000:]}"
    return proc


def _save_teacher(folder, seed):
    from transformers import BertTokenizerFast

    from dskd.config import ArchConfig
    from dskd.models import build_from_arch

    tokenizer = BertTokenizerFast(vocab=str(BERT_VOCAB))
    model = build_from_arch(ArchConfig(layers=4, hidden=32, heads=4, intermediate=64), len(tokenizer), 2,
                            tokenizer.pad_token_id, seed, "teacher.arch")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(session_tmp):
    glue = require_shared("glue", "MRPC").parent
    root = session_tmp / "cache"
    root.mkdir()
    teacher = _save_teacher(root / "teacher", 3)
    overrides = {
        "data.task": "mrpc", "data.path": str(glue), "data.max_length": 24,
        "teacher": {"path": str(teacher)}, "student.layers": 2, "losses": LOSSES,
        "training.epochs": 1, "training.save_every": 4, "training.eval_every": 8,
        "training.deepspeed": "ds_configs/zero1_fp32.json",
    }
    cfg = write_config(root / "exp.yaml", overrides)
    store = root / "store"
    proc = _ok(run_dskd(["cache-teacher", "--config", cfg, "--output", store, "--batch-size", 16], root, nproc=2))
    return {"root": root, "cfg": cfg, "store": store, "teacher": teacher, "overrides": overrides, "write": proc}


def _run(setup, name, *extra, nproc=1, cached=True):
    out = setup["root"] / name
    args = ["distill", "--config", setup["cfg"], "--output", out, *extra]
    if cached:
        args += ["--set", f"teacher.cache={setup['store']}"]
    return _ok(run_dskd(args, setup["root"], nproc=nproc)), out


def _scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if tag.startswith("train/loss/")}


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _assert_same_run(a, b):
    sa, sb = _scalars(a / "tensorboard"), _scalars(b / "tensorboard")
    assert sa.keys() == sb.keys() and "train/loss/attention_kl/L2" in sa
    assert sa == sb  # bitwise: float equality of every logged loss
    wa, wb = _weights(a / "model"), _weights(b / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma == mb


def test_two_ranks_write_one_shard_each_with_a_complete_manifest(setup):
    manifest = json.loads((setup["store"] / "manifest.json").read_text())
    assert manifest["layout"]["fields"] == ["logits", "cls", "attention_qk"]
    assert manifest["layout"]["layers"] == [2, 4]  # student layers 1, 2 <- teacher layers 2, 4
    assert [s["examples"] for s in manifest["shards"]["train"]] == [128, 128]
    assert manifest["identity"]["max_length"] == 24 and manifest["identity"]["task"] == "mrpc"
    assert manifest["identity"]["data"]["train"]["examples"] == 256
    qk = np.load(setup["store"] / "train" / "shard-1" / "qk_L4.npy", mmap_mode="r")
    assert qk.shape == (128 * 24, 2, 32) and qk.dtype == np.float32


@pytest.mark.parametrize("nproc, seed", [(1, 7), (2, 8)])
def test_cached_run_equals_the_online_run_bitwise(setup, nproc, seed):
    """Written on 2 ranks; read on 1 and on 2 ranks, each with its own shuffle (seed)."""
    proc, cached = _run(setup, f"cached-{nproc}", "--set", f"seed={seed}", nproc=nproc)
    _, online = _run(setup, f"online-{nproc}", "--set", f"seed={seed}", nproc=nproc, cached=False)
    _assert_same_run(cached, online)
    assert "no teacher model is loaded" in proc.stderr
    run = json.loads((cached / "run.json").read_text())
    assert run["teacher_cache"] == str(setup["store"])


def test_a_cached_run_starts_from_student_init_as_the_online_run_does(setup, tmp_path):
    """The task stage of two-stage distillation with a teacher cache: the student comes from
    student.init (it crashed, and would otherwise have been copied from the teacher)."""
    from transformers import BertTokenizerFast

    from dskd.config import ArchConfig
    from dskd.models import build_from_arch

    tokenizer = BertTokenizerFast(vocab=str(BERT_VOCAB))
    stage1 = tmp_path / "stage1"
    build_from_arch(ArchConfig(layers=2, hidden=32, heads=4, intermediate=64), len(tokenizer), 2,
                    tokenizer.pad_token_id, 11, "student.arch", "AutoModel").save_pretrained(stage1)
    tokenizer.save_pretrained(stage1)
    init = ["--set", f"student.init={stage1}", "--set", "student.layers=null", "--set", "seed=5"]
    _, cached = _run(setup, "init-cached", *init)
    _, online = _run(setup, "init-online", *init, cached=False)
    _assert_same_run(cached, online)


def test_a_cached_run_resumes_exactly(setup):
    full = setup["root"] / "cached-1"
    if not (full / "metrics.json").is_file():
        _run(setup, "cached-1", "--set", "seed=7")
    _run(setup, "cached-split", "--set", "seed=7", "--set", "training.halt_after_steps=6")
    _run(setup, "cached-split", "--set", "seed=7", "--resume")
    _assert_same_run(full, setup["root"] / "cached-split")


def test_a_cached_run_needs_no_teacher_weights_without_init_from_teacher(setup, tmp_path):
    """Student built from config, tokenizer and teacher geometry from the cache: the
    teacher's folder is not needed at all."""
    cfg = write_config(tmp_path / "arch.yaml", {
        **setup["overrides"], "teacher": {"cache": str(setup["store"])},
        "student.init_from_teacher": False, "student.layers": None,
        "student.arch": {"layers": 2, "hidden": 24, "heads": 2, "intermediate": 48},
        "training.halt_after_steps": 2,
    })
    proc = _ok(run_dskd(["distill", "--config", cfg, "--output", tmp_path / "run"], setup["root"]))
    assert "halted after step 2" in proc.stderr


DIFFERENT = "was written for a different run"


@pytest.mark.parametrize("overrides, needles", [
    ({"data.max_length": 32}, [DIFFERENT, "max_length: cache 24, run 32"]),
    ({"data.train_limit": 128}, [DIFFERENT, "data.train.examples: cache 256, run 128"]),
    ({"teacher.tokenizer": "pkg://bert-base-uncased"}, []),  # the same vocabulary, loaded another way: accepted
    ({"layer_map": [1, 3]}, ["stores teacher layers [2, 4]; the layer map also needs [1, 3]"]),
])
def test_a_cache_of_another_run_is_refused_naming_what_differs(setup, overrides, needles, tmp_path):
    cfg = write_config(tmp_path / "other.yaml", {**setup["overrides"], **overrides,
                                                  "training.halt_after_steps": 1})
    args = ["distill", "--config", cfg, "--output", tmp_path / "run", "--set", f"teacher.cache={setup['store']}"]
    proc = run_dskd(args, setup["root"])
    if needles:
        _fails(proc, "teacher.cache", *needles)
        assert not (tmp_path / "run").exists()  # refused before anything was written
    else:
        _ok(proc)


def test_a_cache_of_another_teacher_is_refused(setup, tmp_path):
    other = _save_teacher(tmp_path / "other-teacher", 4)
    proc = run_dskd(["distill", "--config", setup["cfg"], "--output", tmp_path / "run",
                     "--set", f"teacher.path={other}", "--set", f"teacher.cache={setup['store']}"], setup["root"])
    _fails(proc, "was written for a different run (teacher: cache")


# ---------------------------------------------------------------- in-process checks


def test_damaged_or_unfinished_caches_are_refused(setup, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(setup["store"], copy)
    cache_reader.TeacherCache(copy).verify("full")  # intact

    qk = copy / "train" / "shard-0" / "qk_L2.npy"
    data = bytearray(qk.read_bytes())
    data[-5] ^= 0xFF
    qk.write_bytes(bytes(data))
    cache_reader.TeacherCache(copy).verify("sizes")  # a flipped bit keeps the size ...
    with pytest.raises(Exception, match="qk_L2.npy fails its checksum"):
        cache_reader.TeacherCache(copy).verify("full")  # ... but not the checksum

    with qk.open("r+b") as f:
        f.truncate(len(data) - 100)
    with pytest.raises(Exception, match="manifest says .* \\(truncated\\?\\)"):
        cache_reader.TeacherCache(copy).verify("sizes")

    (copy / "manifest.json").unlink()
    with pytest.raises(Exception, match="unfinished cache .* resumes where it stopped"):
        cache_reader.TeacherCache(copy)


def _splits_and_teacher(setup):
    from dskd import data, models
    from dskd.teacher import online
    from dskd.models.capture import QKCapture
    from dskd.methods import load_experiment

    cfg = load_experiment(setup["cfg"])
    task = data.get_task(cfg.data.task)
    tokenizer = models.load_tokenizer(cfg.teacher)
    prints = {}
    train, dev = data.load_data(cfg, task, tokenizer, prints)
    model = models.freeze(online.load_teacher(cfg, task, tokenizer), torch.float32, torch.device("cpu"))
    teacher = online.TeacherSide(model, QKCapture(model, [2, 4], "teacher"))
    return cfg, tokenizer, {"train": train, "dev": dev}, teacher, prints


def _write(setup, out, teacher, dtype="float32", world=1, batch=16, **kw):
    cfg, tokenizer, splits, _, prints = setup["parts"]
    spec = cache.CacheSpec(("logits", "cls", "attention_qk"), (2, 4))
    identity = cache.identity_for(cfg, tokenizer, prints, "t")
    layout = {"fields": list(spec.fields), "layers": [2, 4], "dtype": dtype, "world_size": world, "batch_size": batch}
    config = {**json.loads(teacher.model.config.to_json_string()), "num_labels": 2}
    return cache.write(out, identity, layout, {}, splits, teacher, spec, batch, tokenizer, config, False,
                       log=lambda *a: setup["log"].append(" ".join(map(str, a))), **kw)


@pytest.fixture(scope="module")
def parts(setup):
    setup["parts"] = _splits_and_teacher(setup)
    setup["log"] = []
    return setup


def test_interrupted_writing_resumes_and_gives_the_same_files(parts, tmp_path):
    teacher = parts["parts"][3]
    _write(parts, tmp_path / "clean", teacher)
    calls = {"n": 0}

    def die_on_fifth(module, args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")

    handle = teacher.model.register_forward_pre_hook(die_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        _write(parts, tmp_path / "killed", teacher, flush_every=3)
    handle.remove()
    with pytest.raises(Exception, match="unfinished cache"):
        cache_reader.TeacherCache(tmp_path / "killed")
    assert json.loads((tmp_path / "killed" / "train" / "shard-0" / "progress.json").read_text()) == {"batches": 3}
    parts["log"].clear()
    _write(parts, tmp_path / "killed", teacher)
    assert "[cache] train: resuming at batch 3/16" in parts["log"]
    for clean in sorted((tmp_path / "clean").rglob("*.npy")):
        resumed = tmp_path / "killed" / clean.relative_to(tmp_path / "clean")
        assert clean.read_bytes() == resumed.read_bytes(), clean.name


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_read_outputs_match_the_online_teacher_in_any_order(parts, tmp_path, dtype):
    """Shuffled, padded batches read back what the teacher computes for them (exactly
    for the fp32 logits; at the storage dtype's rounding for [CLS] and Q/K)."""
    from dskd import data

    _, tokenizer, splits, teacher, _ = parts["parts"]
    _write(parts, tmp_path / dtype, teacher, dtype=dtype)
    store = cache_reader.TeacherCache(tmp_path / dtype)
    store.verify("full")
    pairs = ((1, 2), (2, 4))
    needs = frozenset({"cls", "attention_qk"})
    order = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(0))[:32].tolist()
    for rows in (order[:16], order[16:32]):
        batch = data.collate([splits["train"][i] for i in rows], tokenizer)
        got = store.outputs(batch, needs, pairs, "train")
        want = teacher.outputs(batch, needs, pairs)
        assert torch.equal(got["logits"], want["logits"])  # fp32 always; same batch shape as written
        tol = {"float32": 0, "float16": 1e-3, "bfloat16": 1e-2}[dtype]
        for g, w in zip(got["cls"], want["cls"]):
            assert g.dtype == cache.STORAGE_DTYPES[dtype]
            torch.testing.assert_close(g.float(), w, atol=tol, rtol=tol)
        for (gq, gk), (wq, wk) in zip(got["attention_qk"], want["attention_qk"]):
            assert gq.shape == wq.shape == (len(rows), 4, 24, 8)
            torch.testing.assert_close(gq.float(), wq, atol=tol * 4, rtol=tol)
            torch.testing.assert_close(gk.float(), wk, atol=tol * 4, rtol=tol)
    dev = data.collate([splits["dev"][i] for i in (5, 0, 9)], tokenizer)
    assert torch.equal(store.outputs(dev, frozenset(), (), "dev")["logits"][1],
                       store.outputs(data.collate([splits["dev"][0]], tokenizer), frozenset(), (), "dev")["logits"][0])
    with pytest.raises(Exception, match="no `dev` example with idx \\[9999\\]"):
        store.outputs({**dev, "idx": torch.tensor([9999, 0, 1])}, frozenset(), (), "dev")


def test_plan_estimates_the_written_bytes_exactly(setup):
    from dskd.methods import load_experiment
    from dskd.commands.plan import make_plan

    plan = make_plan(load_experiment(setup["cfg"]))
    for split in ("train", "dev"):
        written = 0
        for shard in (setup["store"] / split).iterdir():
            for f in shard.glob("*.npy"):
                array = np.load(f, mmap_mode="r")
                written += array.size * array.itemsize  # data bytes, without the .npy header
        assert written == plan["cache"]["splits"][split]["total_bytes"]
    assert plan["cache"]["teacher_layers"] == [2, 4]
    assert plan["summary"].startswith("teacher, mrpc, 2 mapped layers, S=24, float32: ")
    sb = plan["memory_per_rank"]["student_bytes"]
    assert sb["total"] == 16 * plan["memory_per_rank"]["student_params"]  # fp32 Adam, ZeRO-1 on 1 rank


def test_student_from_teacher_files_reads_the_same_weights_as_the_loaded_teacher(setup):
    from dskd import models
    from dskd.config import StudentConfig

    cfg = StudentConfig(layers=2)
    partial, layers = models.student_from_teacher_files(str(setup["teacher"]), cfg, 2)
    full, full_layers = models.student_from_teacher(models.load_pretrained(str(setup["teacher"]), 2, False), cfg)
    assert layers == full_layers == [2, 4]
    a, b = partial.state_dict(), full.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_write_with_other_settings_is_refused(parts, tmp_path):
    teacher = parts["parts"][3]
    _write(parts, tmp_path / "c", teacher)
    (tmp_path / "c" / "manifest.json").unlink()  # as if interrupted at the very end
    with pytest.raises(Exception, match="written with other settings \\(layout.dtype: cache 'float32', run 'float16'"):
        _write(parts, tmp_path / "c", teacher, dtype="float16")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="not empty and holds no dskd teacher cache"):
        _write(parts, tmp_path / "other", teacher)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_plan_and_dry_run_print_the_estimate_and_write_nothing(setup, tmp_path):
    plan = _ok(run_dskd(["plan", "--config", setup["cfg"], "--world-size", "4", "--deepspeed",
                         "ds_configs/zero3_bf16.json", "--json"], setup["root"]))
    parsed = json.loads(plan.stdout)
    assert parsed["memory_per_rank"]["zero_stage"] == 3 and parsed["cache"]["dtype"] == "bfloat16"
    sb = parsed["memory_per_rank"]["student_bytes"]
    params = parsed["memory_per_rank"]["student_params"]
    assert (sb["weights"], sb["gradients"], sb["optimizer"]) == (2 * params // 4, 2 * params // 4, 12 * params // 4)
    dry = _ok(run_dskd(["cache-teacher", "--config", setup["cfg"], "--output", tmp_path / "c", "--dry-run"],
                       setup["root"]))
    assert dry.stdout.startswith("teacher, mrpc, 2 mapped layers, S=24, float32: ")
    assert "attention stored as L x L maps instead of Q/K would take" in dry.stdout
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("args, message", [
    (["plan", "--dtype", "fp8"], "--dtype: unknown cache dtype 'fp8'; use fp32, fp16 or bf16"),
    (["plan", "--world-size", "0"], "--world-size must be at least 1, got 0"),
    (["cache-teacher", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
])
def test_bad_cache_and_plan_options_are_named(setup, tmp_path, args, message):
    extra = ["--output", tmp_path / "c"] if args[0] == "cache-teacher" else []
    proc = run_dskd([*args, "--config", setup["cfg"], *extra], setup["root"])
    _fails(proc, message)
    assert not (tmp_path / "c").exists()
