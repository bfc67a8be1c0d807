"""A converted model through Lightning's other paths: ddp_spawn's main process, FSDP2
(ModelParallelStrategy), load_from_checkpoint, gradient accumulation."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from lightning_helpers import (
    ShardedClassifier,
    StateDump,
    TinyClassifier,
    loader,
    make_data,
    trainer,
)
from torch.utils.data import DataLoader

import lightning_whiten as lw
from lightning_whiten.schedules import Linear

OPTIONS = {"group_size": 8, "iterations": 5}


def callback(**kwargs) -> lw.WhiteningCallback:
    return lw.WhiteningCallback(
        "iternorm", layer_options=OPTIONS, exclude="aux", log_report=False, **kwargs
    )


# -- ddp_spawn ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_spawn_leaves_the_users_model_converted_with_the_trained_state(tmp_path):
    # Lightning loads rank 0's weights back into the main process's model with strict=False:
    # before, into its original BatchNorms (the whitening weights dropped, running_var at init).
    seed_everything(0)
    model = TinyClassifier()
    strategy = DDPStrategy(start_method="spawn", find_unused_parameters=True)
    t = trainer(tmp_path, [callback(schedules={"momentum": Linear(0.2, 0.05, unit="step", stop=3)}),
                           StateDump(str(tmp_path))],
                strategy=strategy, devices=2, max_steps=3)  # fmt: skip
    t.fit(model, loader(n=64))
    worker = torch.load(tmp_path / "rank0.pt")
    assert worker["types"]["net.1"] == "IterNorm"  # the workers trained a converted copy
    assert type(model.net[1]).__name__ == "IterNorm" and type(model.net[4]).__name__ == "IterNorm"
    state = model.state_dict()
    assert state.keys() == worker["state"].keys()
    for key, value in worker["state"].items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    assert not torch.allclose(state["net.1.running_whitening"][0], torch.eye(8))  # it trained
    # the schedule's value reached at the end is set back as well
    # (2 steps: 64 samples over 2 ranks in batches of 16; the last at step 1)
    assert model.net[1].momentum == pytest.approx(Linear(0.2, 0.05, unit="step", stop=3)(1))


# -- FSDP2 ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp2_worker(rank: int, port: int, directory: str) -> None:
    # ModelParallelStrategy launches processes by re-running the script; under pytest the
    # processes are made here and Lightning joins them (LOCAL_RANK set: created externally).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")  # fmt: skip
    from lightning.pytorch.strategies import ModelParallelStrategy

    def fit(model, name):
        out = os.path.join(directory, name)
        os.makedirs(out, exist_ok=True)
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        t = trainer(directory, [callback(), StateDump(out)], strategy=strategy, devices=2,
                    max_steps=3)  # fmt: skip
        t.fit(model, loader(n=64))

    seed_everything(0)
    # built and sharded in configure_model without converting first: refused, naming the fix
    try:
        fit(ShardedClassifier(build_in="configure_model", convert_first=False), "refused")
    except TypeError as err:
        message = str(err)
    else:
        message = "no error"
    torch.save(message, os.path.join(directory, f"refused{rank}.pt"))
    seed_everything(0)
    fit(ShardedClassifier(), "init")  # built in __init__: the callback converts first
    seed_everything(0)
    fit(ShardedClassifier(build_in="configure_model"), "configure")  # the helper converts
    # Lightning leaves a process group it did not launch to its creator. Rank 1 sometimes
    # aborted at exit after every fit had finished and saved ("terminate called without an
    # active exception": a store/gloo thread outliving rank 0, which hosts the store, during
    # interpreter teardown). Both ranks wait for each other, release the group, and leave
    # without running C++ static destructors: the results are on disk already.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    os._exit(0)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_converts_before_sharding_and_ranks_stay_equal(tmp_path):
    # Before: the callback converted after configure_model's fully_shard; the new layers were
    # neither sharded nor reduced, and the ranks' whitening weights drifted apart.
    mp.spawn(_fsdp2_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        message = torch.load(tmp_path / f"refused{rank}.pt")
        assert "DTensor" in message and "convert_in_configure_model" in message, message
    for name in ("init", "configure"):
        rank0 = torch.load(tmp_path / name / "rank0.pt")
        rank1 = torch.load(tmp_path / name / "rank1.pt")
        assert rank0["types"]["net.1"] == "IterNorm", name
        assert {"net.1.weight", "net.4.bias"} <= set(rank0["sharded"]), rank0["sharded"]
        for key, value in rank0["state"].items():
            torch.testing.assert_close(value, rank1["state"][key], rtol=0, atol=0, msg=key)
        # it trained: the whitening weights left their initial ones (BN's 1)
        assert not torch.allclose(rank0["state"]["net.1.weight"], torch.ones(32)), name


# -- load_from_checkpoint -------------------------------------------------------------------------
class WhitenedTiny(lw.WhitenedModuleMixin, TinyClassifier):
    """The one line a user adds."""


@pytest.mark.slow
def test_load_from_checkpoint_with_the_mixin_and_the_errors_without(tmp_path):
    seed_everything(0)
    model = WhitenedTiny()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    schedule = {"momentum": Linear(0.3, 0.1, unit="step", stop=4)}
    t = trainer(tmp_path, [callback(schedules=schedule), checkpoint],
                enable_checkpointing=True, max_steps=4)  # fmt: skip
    t.fit(model, loader(n=64))
    path = checkpoint.last_model_path
    x = next(iter(loader(n=16)))[0]
    model.eval()
    with torch.no_grad():
        expected = model(x)

    loaded = WhitenedTiny.load_from_checkpoint(path).eval()
    assert type(loaded.net[1]).__name__ == "IterNorm"
    assert loaded.net[1].momentum == model.net[1].momentum != 0.3  # the schedule's last value
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)

    # without the mixin: the cause and the one line, not a key mismatch
    with pytest.raises(RuntimeError, match=r"WhitenedModuleMixin.*load_converted\(TinyClassifier"):
        TinyClassifier.load_from_checkpoint(path)
    # strict=False: a warning naming the layers left as BatchNorm
    with pytest.warns(UserWarning, match=r"net\.1 \(IterNorm, here BatchNorm2d\)"):
        TinyClassifier.load_from_checkpoint(path, strict=False)

    # resuming with the mixin: the callback converted at setup, the hook changes nothing
    t2 = trainer(
        tmp_path,
        [callback(schedules=schedule), StateDump(str(tmp_path))],
        max_steps=6,
        max_epochs=2,
    )
    resumed = WhitenedTiny()
    t2.fit(resumed, loader(n=64), ckpt_path=path)
    assert t2.global_step > 4 and type(resumed.net[1]).__name__ == "IterNorm"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in resumed.net.modules())


# -- gradient accumulation -------------------------------------------------------------------------
@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_schedules_change_only_between_optimizer_steps_under_accumulation(tmp_path, unit):
    seed_everything(0)
    model = TinyClassifier()
    # 8 batches an epoch, 4 optimizer steps: the momentum moves at every optimizer step
    stop = 1.0 if unit == "epoch" else 4
    schedule = {"momentum": Linear(0.4, 0.0, stop=stop, unit=unit)}
    t = trainer(tmp_path, [callback(schedules=schedule)], accumulate_grad_batches=2)
    t.fit(model, loader(batch_size=8, n=64))
    seen = [round(s["momentum"], 6) for s in model.seen]
    assert len(seen) == 8
    assert all(seen[i] == seen[i + 1] for i in range(0, 8, 2)), seen  # within one step
    assert seen[::2] == [round(0.4 - 0.1 * k, 6) for k in range(4)], seen  # one per step


# -- tuner trials ------------------------------------------------------------------------------------
class TunableTiny(TinyClassifier):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.batch_size = 4

    def train_dataloader(self):
        return DataLoader(make_data(64), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(make_data(16), batch_size=8)


def test_batch_size_finder_trials_run_at_the_schedules_start_value(tmp_path):
    # Before: the trials ran before any training batch had applied the schedules, at the
    # layer's constructor value (momentum 0.9 here, while training starts at 0.3).
    from lightning.pytorch.callbacks import BatchSizeFinder

    seed_everything(0)
    model = TunableTiny()
    whiten = lw.WhiteningCallback(
        "iternorm", layer_options={**OPTIONS, "momentum": 0.9}, exclude="aux", log_report=False,
        schedules={"momentum": Linear(0.3, 0.1, stop=100, unit="step")},
    )  # fmt: skip
    finder = BatchSizeFinder(max_trials=2, steps_per_trial=1)
    trainer(tmp_path, [whiten, finder], max_steps=1).fit(model)
    seen = [round(s["momentum"], 6) for s in model.seen]
    assert len(seen) == 3 and seen == [0.3] * 3, seen  # 2 trials, then the first step
