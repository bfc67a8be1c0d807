"""ddp_spawn: the user's model after fit; load_from_checkpoint of a converted checkpoint."""

import sys
import tempfile
import warnings

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "tests"))
import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning_helpers import TinyClassifier, loader

import lightning_whiten as lw


def acc(model, dl):
    model.eval()
    c = n = 0
    with torch.no_grad():
        for x, y in dl:
            c += (model(x).argmax(1) == y).sum().item()
            n += len(y)
    return c / n


if __name__ == "__main__":
    mode = sys.argv[1]
    tmp = tempfile.mkdtemp()
    pl.seed_everything(0)
    model = TinyClassifier(lr=0.05)
    cb = lw.WhiteningCallback(
        "iternorm",
        layer_options={"group_size": 8, "iterations": 5},
        exclude="aux",
        log_report=False,
    )
    kw = dict(
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
    )
    if mode == "spawn":
        t = pl.Trainer(
            devices=2,
            strategy=DDPStrategy(start_method="spawn", find_unused_parameters=True),
            callbacks=[cb],
            **kw,
        )
    else:
        t = pl.Trainer(devices=1, callbacks=[cb], **kw)
    t.fit(model, loader(n=256))
    path = t.checkpoint_callback.best_model_path
    ref = lw.load_converted(TinyClassifier, path)
    test = loader(n=256, seed=0)
    print("types of net.1 in the user's model:", type(model.net[1]).__name__)
    print("user's model accuracy:", acc(model, test), " load_converted:", acc(ref, test))
    x = next(iter(test))[0]
    with torch.no_grad():
        print(
            "user's model output diff vs load_converted:",
            (model.eval()(x) - ref(x)).abs().max().item(),
        )
    if mode == "lfc":
        try:
            TinyClassifier.load_from_checkpoint(path)
            print("strict: loaded")
        except Exception as e:
            print("strict error:", type(e).__name__, str(e)[:300].replace("\n", " "))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            m = TinyClassifier.load_from_checkpoint(path, strict=False)
        print(
            "strict=False warnings:",
            [
                str(x.message)[:150]
                for x in w
                if "whiten" in str(x.message).lower() or "keys" in str(x.message)
            ],
        )
        x = next(iter(test))[0]
        with torch.no_grad():
            print(
                "strict=False accuracy:",
                acc(m, test),
                "output diff vs load_converted:",
                (m.eval()(x) - ref(x)).abs().max().item(),
            )
