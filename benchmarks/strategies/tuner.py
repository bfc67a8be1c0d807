import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "tests"))
import lightning.pytorch as pl
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder
from lightning_helpers import TinyClassifier, make_data
from torch.utils.data import DataLoader

import lightning_whiten as lw
from lightning_whiten.schedules import Linear


class M(TinyClassifier):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.batch_size = 4

    def train_dataloader(self):
        return DataLoader(make_data(64), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(make_data(16), batch_size=8)


for which in ("bs", "lr"):
    m = M()
    tuner = (
        BatchSizeFinder(max_trials=2, steps_per_trial=2)
        if which == "bs"
        else LearningRateFinder(num_training_steps=4)
    )
    cb = lw.WhiteningCallback(
        "iternorm",
        layer_options={"group_size": 8, "momentum": 0.9},
        exclude="aux",
        log_report=False,
        schedules={"momentum": Linear(0.3, 0.1, stop=100, unit="step")},
    )
    t = pl.Trainer(
        default_root_dir=__import__("tempfile").mkdtemp(),
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[cb, tuner],
    )
    t.fit(m)
    print(
        which,
        "momentum seen per training_step (trials, then training):",
        [round(s["momentum"], 4) for s in m.seen],
    )
