import json

import pytest
import torch

from dskd import engine
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
