import json

import pytest
import torch

from dskd.training import engine
from dskd.config import TrainingConfig
from dskd.errors import DskdError

from conftest import REPO


def test_every_shipped_deepspeed_config_loads():
    names = sorted(p.name for p in (REPO / "ds_configs").glob("*.json"))
    assert names == [f"zero{s}_{d}.json" for s in range(4) for d in ("bf16", "fp16", "fp32")]
    for name in names:
        ds, _ = engine.load_ds_config(f"ds_configs/{name}", TrainingConfig(batch_size=8, grad_accum=2))
        assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 2
        assert engine.zero_stage(ds) == int(name[4])
        assert engine.run_dtype(ds) == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name[6:10]]


def test_conflicting_and_forbidden_keys_are_named(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}))
    with pytest.raises(DskdError, match=r"`train_micro_batch_size_per_gpu` is 4 but `training.batch_size` is 32"):
        engine.load_ds_config(str(path), TrainingConfig())
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(DskdError, match=r"remove `optimizer`"):
        engine.load_ds_config(str(path), TrainingConfig())
    path.write_text("{nope")
    with pytest.raises(DskdError, match=r"ds.json: not valid JSON"):
        engine.load_ds_config(str(path), TrainingConfig())
    with pytest.raises(DskdError, match=r"DeepSpeed config missing.json not found .* zero2_bf16.json"):
        engine.load_ds_config("missing.json", TrainingConfig())


def test_fp16_on_a_cpu_without_fp16_gets_our_message(monkeypatch):
    monkeypatch.setattr(engine, "cpu_supports_fp16", lambda: False)
    monkeypatch.setattr(engine, "is_cpu", lambda: True)
    ds, file = engine.load_ds_config("ds_configs/zero2_fp16.json", TrainingConfig())
    with pytest.raises(DskdError, match=r"zero2_fp16.json enables fp16, which this CPU cannot train in .*zero2_bf16.json"):
        engine.check_precision_supported(ds, file)
    ds, file = engine.load_ds_config("ds_configs/zero2_bf16.json", TrainingConfig())
    engine.check_precision_supported(ds, file)  # bf16 is fine


def test_no_weight_decay_on_bias_and_layernorm():
    layer = torch.nn.Sequential()
    layer.add_module("dense", torch.nn.Linear(3, 3))
    layer.add_module("LayerNorm", torch.nn.LayerNorm(3))
    decay, no_decay = engine.param_groups(layer, 0.1)
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([3, 3])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


SKIP_ALLREDUCE_SCRIPT = """
import torch
from dskd.training import engine as eng
from dskd.config import TrainingConfig

eng.init_distributed()
training = TrainingConfig(batch_size=4, lr=1e-2)
ds, _ = eng.load_ds_config("ds_configs/zero0_fp32.json", training)

def build():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
    return eng.initialize(module, ds, training, lambda step: 1.0)

skipping, reducing = build(), build()
reducing.enable_backward_allreduce = True  # what DeepSpeed does by default
assert skipping.enable_backward_allreduce is False
g = torch.Generator().manual_seed(1)
for _ in range(3):
    x, y = torch.randn(4, 8, generator=g), torch.randint(0, 2, (4,), generator=g)
    for e in (skipping, reducing):
        e.backward(torch.nn.functional.cross_entropy(e(x), y))
        e.step()
for a, b in zip(skipping.module.parameters(), reducing.module.parameters(), strict=True):
    assert torch.equal(a, b), (a - b).abs().max()
print("same")
"""


def test_one_rank_zero0_skips_the_self_allreduce_without_changing_a_bit(tmp_path):
    import subprocess
    import sys

    from conftest import dskd_env

    proc = subprocess.run([sys.executable, "-c", SKIP_ALLREDUCE_SCRIPT], cwd=REPO, env=dskd_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("same")
