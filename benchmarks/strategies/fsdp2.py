"""FSDP2 (ModelParallelStrategy, fully_shard in configure_model, gloo CPU, 2 ranks): rank difference."""

import os
import socket
import sys
import tempfile

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "tests"))


def worker(rank, port, out, mode):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from lightning_helpers import TinyClassifier, loader
    from torch.distributed.fsdp import fully_shard

    import lightning_whiten as lw

    class Sharded(TinyClassifier):
        def configure_model(self):
            if getattr(self, "_sharded", False):
                return
            self._sharded = True
            if mode == "helper":
                lw.convert(self.net, "iternorm", group_size=8, iterations=5)
            for m in self.net:
                if isinstance(m, torch.nn.Conv2d):
                    fully_shard(m, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    pl.seed_everything(0)
    model = Sharded(lr=0.05)
    cbs = (
        []
        if mode == "helper"
        else [
            lw.WhiteningCallback(
                "iternorm",
                layer_options={"group_size": 8, "iterations": 5},
                exclude="aux",
                log_report=False,
            )
        ]
    )
    t = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=cbs,
    )
    t.fit(model, loader(n=128))
    sd = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        sd[k] = v.detach().clone()
    torch.save(
        {"sd": sd, "types": {n: type(m).__name__ for n, m in model.named_modules()}},
        f"{out}.{rank}",
    )


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "callback"
    s = socket.socket()
    s.bind(("", 0))
    port = s.getsockname()[1]
    s.close()
    out = tempfile.mktemp()
    mp.spawn(worker, args=(port, out, mode), nprocs=2, join=True)
    a, b = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    print("types net.1:", a["types"].get("net.1"))
    diffs = {
        k: (a["sd"][k].float() - b["sd"][k].float()).abs().max().item()
        for k in a["sd"]
        if a["sd"][k].is_floating_point()
    }
    print(
        "max rank diff:", max(diffs.values()), {k: round(v, 4) for k, v in diffs.items() if v > 0}
    )
