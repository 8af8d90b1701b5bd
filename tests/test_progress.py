"""Long training stages show progress per optimiser step, not once per epoch (an epoch can take a minute)."""

from __future__ import annotations


def test_every_stage_bar_counts_optimiser_steps(small_dataset, text_encoder, monkeypatch):
    import dpr.train.common as common
    from dpr.config import ModelConfig, TrainConfig
    from dpr.train.pipeline import train

    bars = []

    class Recorder:
        def __init__(self, total=None, desc="", **kw):
            self.total, self.desc, self.updates, self.closed = total, desc, 0, False
            bars.append(self)

        def update(self, n=1):
            self.updates += n

        def set_postfix(self, *a, **kw):
            pass

        def close(self):
            self.closed = True

    monkeypatch.setattr(common, "tqdm", Recorder)
    cfg = TrainConfig(stage1_epochs=2, stage2_epochs=2, stage2_steps_per_epoch=7, stage3_epochs=2,
                      stage3_steps_per_epoch=5, batch_size=64, patience=10)
    train(small_dataset, ModelConfig(d=16, max_len=12, fusion_hidden=32, expert_hidden=32, num_heads=2), cfg,
          text_encoder, log=lambda *a: None, val_users=30)
    by_stage = {b.desc.split(" (")[0]: b for b in bars}
    assert set(by_stage) == {"stage 1", "stage 2", "stage 3"}
    # stage 1: one tick per batch over both epochs (the synthetic users' windows make several batches)
    assert by_stage["stage 1"].updates == by_stage["stage 1"].total and by_stage["stage 1"].total > 2
    assert by_stage["stage 2"].total == by_stage["stage 2"].updates == 2 * 7
    assert by_stage["stage 3"].total == by_stage["stage 3"].updates == 2 * 5
    assert all(b.closed for b in bars)
