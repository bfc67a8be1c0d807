"""Recurrent-convolutional and character-level models: statistics per time step, shapes, text data."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

import lightning_whiten as lw
from lightning_whiten.models.recurrent import CharRNN, ConvGRU
from lightning_whiten.text import CharLM, TextFile


def record_inputs(module: torch.nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().double()))
    return seen


def test_shared_streaming_norm_averages_its_statistics_over_the_time_steps():
    # The paper's recurrent setting: one layer for all steps, short-term statistics = the plain
    # average of every step's batch mean, folded into the long-term ones once per update.
    torch.manual_seed(0)
    options = {"p": 1, "alpha": 0.7, "window": "manual", "momentum": 0.25}
    net = ConvGRU(in_channels=1, hidden=4, norm="streaming", norm_options=options)
    norm = net.norm_gates[0]
    seen = record_inputs(norm)
    x = torch.randn(5, 1, 6, 7)  # 6 time steps (rows)
    net(x)
    assert len(net.norm_gates) == 1 and len(seen) == 6
    step_means = torch.stack([s.mean(dim=(0, 2)) for s in seen])  # per step, per channel
    torch.testing.assert_close(norm.short_mean.double(), step_means.mean(0), rtol=1e-5, atol=1e-6)
    assert float(norm.short_count) == 6
    norm.close_window()  # the weight update: L <- (1 - momentum) L + momentum S, from L = 0
    torch.testing.assert_close(norm.running_mean.double(), 0.25 * step_means.mean(0),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_per_step_norms_keep_separate_statistics_for_every_step():
    # Recurrent BatchNorm (Cooijmans et al.): step t's layer sees only step t's inputs.
    torch.manual_seed(0)
    net = ConvGRU(in_channels=1, hidden=4, norm="batchnorm", norm_per_step=True, steps=6,
                  norm_options={"momentum": 1.0})  # fmt: skip
    seen = [record_inputs(m) for m in net.norm_candidate]
    net(torch.randn(5, 1, 6, 7))
    for t, layer in enumerate(net.norm_candidate):
        assert len(seen[t]) == 1
        torch.testing.assert_close(layer.running_mean.double(), seen[t][0].mean(dim=(0, 2)),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="per-step layers"):
        net(torch.randn(2, 1, 5, 7))


def test_conv_gru_is_a_recurrence_over_rows():
    torch.manual_seed(0)
    net = ConvGRU(num_classes=3, in_channels=2, hidden=4, norm="none").eval()
    x = torch.randn(2, 2, 5, 6)
    out = net(x)
    assert out.shape == (2, 3)
    # the last hidden state depends on the first row (a recurrence, not the last row alone)
    y = x.clone()
    y[:, :, 0] += 1
    assert not torch.allclose(net(y), out)
    # and the result of a row-by-row reference loop in float64
    net64 = net.double()
    x64 = x.double()
    h = torch.zeros(2, 4, 6, dtype=torch.float64)
    for t in range(5):
        a = net64.input(x64[:, :, t])
        gates = torch.sigmoid(a[:, :8] + net64.recurrent_gates(h))
        r, z = gates[:, :4], gates[:, 4:]
        n = torch.tanh(a[:, 8:] + net64.recurrent_candidate(r * h))
        h = (1 - z) * h + z * n
    torch.testing.assert_close(net64(x64), net64.classifier(h.mean(-1)))


def test_layernorm_in_the_conv_recurrence_normalizes_each_sample_over_channels_and_width():
    net = ConvGRU(in_channels=1, hidden=4, norm="layernorm")
    assert isinstance(net.norm_gates[0], torch.nn.GroupNorm) and net.norm_gates[0].num_groups == 1


def test_conv_gru_backbone_through_image_classifier():
    model = lw.ImageClassifier("small/conv_gru", num_classes=10,
                               backbone_options={"hidden": 8, "norm": "streaming"})  # fmt: skip
    assert model(torch.randn(3, 3, 8, 8)).shape == (3, 10)


def test_char_rnn_shares_one_streaming_layer_over_the_sequence():
    torch.manual_seed(0)
    net = CharRNN(vocab=11, embedding=4, hidden=6, norm="streaming",
                  norm_options={"window": "manual"})  # fmt: skip
    seen = record_inputs(net.norm[0])
    logits = net(torch.randint(0, 11, (3, 9)))
    assert logits.shape == (3, 9, 11) and len(seen) == 9
    torch.testing.assert_close(net.norm[0].short_mean.double(),
                               torch.stack([s.mean(0) for s in seen]).mean(0),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_text_file_targets_are_the_next_characters_and_validation_is_held_out(tmp_path):
    path = tmp_path / "corpus.txt"
    text = "the quick brown fox jumps over the lazy dog. " * 20
    path.write_text(text)
    data = TextFile(str(path), seq_len=10, val_fraction=0.2, batch_size=4)
    data.setup()
    assert data.num_classes == len(set(text))
    inputs, targets = data.train_set.tensors
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert data.decode(torch.cat([inputs[0], targets[0, -1:]])) == text[:11]
    cut = int(len(text) * 0.8)
    assert data.decode(data.val_set.tensors[0][0]) == text[cut : cut + 10]
    assert inputs.shape[0] == (cut - 1) // 10  # training chunks come from the first 80% only


def test_text_file_offline_default_is_a_stdlib_source():
    data = TextFile(seq_len=16)
    assert data.path.name == "difflib.py" and "SequenceMatcher" in data.text
    with pytest.raises(ValueError, match="not a pure-Python standard-library module"):
        TextFile(stdlib_module="sys")


def test_char_lm_trains_and_reports_bits_per_character(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("abcabcabd" * 60)
    data = TextFile(str(path), seq_len=12, batch_size=8)
    model = CharLM(num_classes=data.num_classes, embedding=8, hidden=16, lr=1e-2)
    trainer = Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      gradient_clip_val=1.0)  # fmt: skip
    trainer.fit(model, data)
    bpc = float(trainer.callback_metrics["val/bpc"])
    assert bpc == pytest.approx(float(trainer.callback_metrics["val/loss"]) / 0.6931471805599453)
    assert bpc < 1.5  # learned well below the uniform log2(4) = 2 bits of this 4-letter text
    generated = model.generate(data.encode("abc"), 5, generator=torch.Generator().manual_seed(0))
    assert generated.shape == (5,) and set(data.decode(generated)) <= set("abcd")
