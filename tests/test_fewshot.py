"""Few-shot: the episode sampler, the datamodules and Prototypical Networks."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer

import lightning_whiten as lw
from lightning_whiten.fewshot import (
    EpisodeSampler,
    FewShotDigits,
    ProtoNet,
    _EpisodeCollate,
    mean_confidence_interval,
)

LABELS = torch.arange(12).repeat_interleave(20)  # 12 classes of 20 samples


def episodes(sampler):
    return [list(e) for e in sampler]


def test_episode_is_n_way_k_shot_with_distinct_samples_from_the_pool():
    pool = [0, 2, 4, 6, 8, 10, 11]
    sampler = EpisodeSampler(LABELS, pool, n_way=5, k_shot=3, n_query=4, episodes=30, seed=1)
    for episode in episodes(sampler):
        assert len(episode) == 5 * (3 + 4) and len(set(episode)) == len(episode)
        support, query = LABELS[episode[:15]], LABELS[episode[15:]]
        # class-major blocks: K support samples of one class, then the next class
        support_classes = support.view(5, 3)
        query_classes = query.view(5, 4)
        assert (support_classes == support_classes[:, :1]).all()
        assert (query_classes == query_classes[:, :1]).all()
        assert torch.equal(support_classes[:, 0], query_classes[:, 0])  # same classes, same order
        assert len(set(support_classes[:, 0].tolist())) == 5  # n distinct classes
        assert set(support.tolist()) <= set(pool)


def test_sampler_is_seeded_and_training_passes_differ():
    make = lambda seed, reshuffle: EpisodeSampler(LABELS, range(12), 3, 1, 2, 5, seed, reshuffle)  # noqa: E731
    a, b = make(0, True), make(0, True)
    first_a, first_b = episodes(a), episodes(b)
    assert first_a == first_b  # same seed, same episodes
    assert episodes(a) != first_a  # the next training pass draws new episodes
    assert episodes(make(1, True)) != first_a
    evaluation = make(0, False)
    assert episodes(evaluation) == episodes(evaluation)  # evaluation repeats its episodes


def test_sampler_rejects_too_many_ways_or_shots():
    with pytest.raises(ValueError, match="n_way=5 but the class pool has only 4"):
        EpisodeSampler(LABELS, [0, 1, 2, 3], 5, 1, 1, 1)
    with pytest.raises(ValueError, match="k_shot \\+ n_query = 25 samples per class"):
        EpisodeSampler(LABELS, range(12), 5, 5, 20, 1)


def test_digits_episodes_keep_train_and_evaluation_classes_disjoint():
    data = FewShotDigits(train_classes=[0, 1, 2, 3, 4, 5], image_size=8, n_way=3, k_shot=2,
                         n_query=3, episodes_per_epoch=20, val_episodes=20, test_episodes=20)  # fmt: skip
    data.setup()
    seen = {}
    for stage in ("train", "val", "test"):
        loader = getattr(data, f"{stage}_dataloader")()
        seen[stage] = set()
        for batch in loader:
            assert batch["support"].shape == (6, 3, 8, 8) and batch["query"].shape == (9, 3, 8, 8)
            assert batch["support_labels"].tolist() == [0, 0, 1, 1, 2, 2]
            assert batch["query_labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
            seen[stage] |= set(batch["classes"].tolist())
    assert seen["train"] <= {0, 1, 2, 3, 4, 5}
    assert seen["val"] | seen["test"] <= {6, 7, 8, 9}
    assert data.num_classes == 6
    with pytest.raises(ValueError, match="train_classes"):
        FewShotDigits(train_classes=[0, 12])


def test_prototypes_are_class_means_and_logits_negative_squared_distances():
    model = ProtoNet(in_channels=1, hidden=4, depth=1)
    model.net = torch.nn.Flatten()  # identity embedding: check the head against float64 math
    support = torch.randn(6, 1, 1, 2, dtype=torch.float64)
    query = torch.randn(4, 1, 1, 2, dtype=torch.float64)
    labels = torch.tensor([1, 0, 2, 1, 0, 2])  # any order
    batch = {"support": support, "support_labels": labels, "query": query,
             "query_labels": torch.zeros(4, dtype=torch.long)}  # fmt: skip
    s, q = support.flatten(1), query.flatten(1)
    prototypes = torch.stack([s[labels == c].mean(0) for c in range(3)])
    expected = -((q[:, None, :] - prototypes[None]) ** 2).sum(-1)
    torch.testing.assert_close(model.logits(batch).double(), expected, rtol=1e-5, atol=1e-5)


def test_confidence_interval_is_the_normal_approximation():
    values = torch.tensor([0.5, 0.7, 0.6, 0.9])
    mean, ci = mean_confidence_interval(values)
    std = math.sqrt(sum((v - 0.675) ** 2 for v in values.tolist()) / 3)
    assert mean == pytest.approx(0.675)
    assert ci == pytest.approx(1.96 * std / 2)


def test_collate_rejects_a_wrong_episode_size():
    collate = _EpisodeCollate(2, 1, 2)
    with pytest.raises(ValueError, match="expected n_way"):
        collate([(torch.zeros(1), 0)] * 5)


def test_protonet_trains_with_converted_bns_and_reports_accuracy_with_ci():
    data = FewShotDigits(image_size=8, n_way=3, k_shot=1, n_query=5, episodes_per_epoch=8,
                         val_episodes=4, test_episodes=10, seed=3)  # fmt: skip
    model = ProtoNet(hidden=16, depth=3)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[lw.WhiteningCallback("swbn", layer_options={"group_size": 8},
                                                      log_report=False)])  # fmt: skip
    trainer.fit(model, data)
    assert sum(isinstance(m, lw.SWBN) for m in model.modules()) == 3
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(
        not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True)
    )
    result = trainer.test(model, data, verbose=False)[0]
    assert result["test/episodes"] == 10
    assert 0 <= result["test/acc"] <= 1 and 0 < result["test/acc_ci95"] < 0.5
