from dskd.config import StageConfig, TrainingConfig
from dskd.data import epoch_batches
from dskd.training.stages import plan_stages

LOSSES = {"hard_ce": {"weight": 0.5}, "soft_kd": {"weight": 0.5, "temperature": 2.0}, "off": {"type": "soft_kd", "weight": 0}}


def test_no_schedule_is_one_stage_of_every_weighted_term():
    (stage,) = plan_stages([], LOSSES, TrainingConfig(epochs=2.5), steps_per_epoch=10)
    assert (stage.name, stage.start, stage.end) == ("train", 0, 25)
    assert stage.weights == {"hard_ce": 0.5, "soft_kd": 0.5}  # zero-weight terms are not computed


def test_schedule_stages_are_consecutive_step_ranges():
    specs = [
        StageConfig("warm", steps=3, losses={"soft_kd": 1.0}),
        StageConfig("main", epochs=1.5),
        StageConfig("last", epochs=0.25, losses={"hard_ce": 1.0, "soft_kd": 0.0}),
    ]
    stages = plan_stages(specs, LOSSES, TrainingConfig(), steps_per_epoch=8)
    assert [(s.name, s.start, s.end) for s in stages] == [("warm", 0, 3), ("main", 3, 15), ("last", 15, 17)]
    assert stages[0].weights == {"soft_kd": 1.0}
    assert stages[1].weights == {"hard_ce": 0.5, "soft_kd": 0.5}
    assert stages[2].weights == {"hard_ce": 1.0}


def test_epoch_batches_split_the_data_evenly_and_reproducibly():
    per_rank = [epoch_batches(103, 4, seed=1, rank=r, world=2, batch_size=8, grad_accum=3) for r in (0, 1)]
    assert [len(b) for b in per_rank] == [6, 6]  # 51 rows per rank -> 6 full batches, a multiple of grad_accum
    flat = [i for b in per_rank for batch in b for i in batch]
    assert len(flat) == len(set(flat)) == 96 and all(0 <= i < 103 for i in flat)
    assert per_rank[0] == epoch_batches(103, 4, seed=1, rank=0, world=2, batch_size=8, grad_accum=3)
    assert per_rank[0] != epoch_batches(103, 5, seed=1, rank=0, world=2, batch_size=8, grad_accum=3)
