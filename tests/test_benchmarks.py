"""The benchmark harnesses measure what their tables say (run small; no timing is asserted)."""

from __future__ import annotations

import torch

from benchmarks import layers


def test_layer_benchmark_measures_every_candidate_on_every_shape():
    # Regression: a per-row variable shadowed the plain=True option, so the plain-autograd
    # baselines silently ran on the first shape only and the later shapes were measured in a
    # different round mix.
    shapes = [(8, 64, 2, 2), (8, 128, 2, 2)]  # the plain baselines need >= 64 channels
    rows = layers.run(torch.device("cpu"), quick=True, shapes=shapes)
    names = set(layers.candidates(64))
    for shape in shapes:
        key = "x".join(map(str, shape))
        measured = {r["layer"] for r in rows if r["shape"] == key}
        assert measured == names, (key, names - measured)
        for r in rows:
            if r["shape"] == key and f"plain {r['layer']}" in names:
                assert r["vs_plain"] is not None, r
                assert r["vs_authors"] is not None, r
            # every whitening layer of ours has its floor: its GEMMs alone plus BatchNorm's time
            if r["shape"] == key and r["layer"].split()[0] in layers.FLOOR_GEMMS:
                assert 0 < r["gemm_ms"] < r["floor_ms"], r
                assert r["vs_floor"] > 0, r
            if r["layer"].startswith(("plain", "BatchNorm")):
                assert r["vs_floor"] is None, r
    without_plain = layers.run(torch.device("cpu"), quick=True, shapes=shapes[:1], plain=False)
    assert not any(r["layer"].startswith("plain") for r in without_plain)
