"""The offline measurements of docs/guide/experiments.md: the papers' other experiments, on CPU.

    python -m benchmarks.experiments fewshot --layer swbn --seed 0
    python -m benchmarks.experiments noise --recipe digits_convnorm_noisy --rate 0.4 --seed 0
    python -m benchmarks.experiments gan --recipe digits_gan_convnorm --seed 0
    python -m benchmarks.experiments recurrent --recipe recurrent_digits_convgru --norm layernorm
    python -m benchmarks.experiments recurrent --recipe charlm_streaming --norm none

Each run prints one ``RESULT`` line. Every run is a recipe through the CLI (with the overrides
printed), except ``fewshot``, which also runs the 600 test episodes after training (``fit`` then
``test`` on the final weights).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


#: Extra command-line options for every run (``-- --trainer.max_epochs 1`` on the command line).
EXTRA: list[str] = []


def _cli(recipe: str, seed: int, *extra: str):
    from lightning_whiten.cli import run

    args = ["fit", "--config", str(RECIPES / f"{recipe}.yaml"), "--seed_everything", str(seed),
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", "runs/experiments", *extra, *EXTRA]  # fmt: skip
    return run(args)


def fewshot(layer: str, seed: int, k_shot: int) -> str:
    recipe = "fewshot_digits_protonet_bn" if layer == "bn" else "fewshot_digits_protonet_swbn"
    extra = ["--data.init_args.seed", str(seed), "--data.init_args.k_shot", str(k_shot)]
    if layer == "iternorm":  # the SWBN recipe's callback with IterNorm
        extra += ["--trainer.callbacks.init_args.layer", "iternorm"]
    cli = _cli(recipe, seed, *extra)
    result = cli.trainer.test(cli.model, cli.datamodule, verbose=False)[0]
    return (f"fewshot layer={layer} seed={seed} k_shot={k_shot} "
            f"test_acc={result['test/acc']:.4f} ci95={result['test/acc_ci95']:.4f}")  # fmt: skip


def noise(recipe: str, rate: float, seed: int, mode: str) -> str:
    cli = _cli(recipe, seed, "--data.init_args.label_noise",
               f"{{rate: {rate}, mode: {mode}, seed: {seed}}}")  # fmt: skip
    data = cli.datamodule
    wrong = float((data.noisy_labels != data.clean_labels).float().mean())
    acc = float(cli.trainer.callback_metrics["val/acc1"])
    return f"noise {recipe} rate={rate} mode={mode} seed={seed} wrong={wrong:.3f} clean_val_acc={acc:.4f}"


def gan(recipe: str, seed: int, include: str | None) -> str:
    extra = ["--trainer.callbacks.init_args.include", include] if include else []
    m = _cli(recipe, seed, *extra).trainer.callback_metrics
    return (f"gan {recipe} include={include} seed={seed} fd={float(m['val/fd']):.2f} "
            f"fd_real={float(m['val/fd_real']):.2f} feature_acc={float(m['val/feature_acc']):.3f}")  # fmt: skip


def recurrent(recipe: str, norm: str, seed: int) -> str:
    if recipe == "charlm_streaming":
        extra, key = ["--model.init_args.norm", norm], "val/bpc"
        if norm != "streaming":  # the recipe's options are StreamingNorm's
            extra += ["--model.init_args.norm_options", "{}"]
    else:
        extra, key = ["--model.init_args.backbone_options", f"{{norm: {norm}}}"], "val/acc1"
    m = _cli(recipe, seed, *extra).trainer.callback_metrics
    return f"recurrent {recipe} norm={norm} seed={seed} {key}={float(m[key]):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("fewshot")
    p.add_argument("--layer", choices=["bn", "swbn", "iternorm"], default="swbn")
    p.add_argument("--k-shot", type=int, default=1)
    p = sub.add_parser("noise")
    p.add_argument("--recipe", default="digits_convnorm_noisy")
    p.add_argument("--rate", type=float, default=0.4)
    p.add_argument("--mode", default="symmetric")
    p = sub.add_parser("gan")
    p.add_argument("--recipe", default="digits_gan_convnorm")
    p.add_argument("--include", default=None, help="e.g. 'generator.*' (ConvNorm recipes)")
    p = sub.add_parser("recurrent")
    p.add_argument("--recipe", default="recurrent_digits_convgru")
    p.add_argument("--norm", default="streaming")
    for p in sub.choices.values():
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("extra", nargs="*", help="after --: options passed to the CLI run")
    a = parser.parse_args()
    EXTRA[:] = a.extra
    start = time.perf_counter()
    if a.what == "fewshot":
        line = fewshot(a.layer, a.seed, a.k_shot)
    elif a.what == "noise":
        line = noise(a.recipe, a.rate, a.seed, a.mode)
    elif a.what == "gan":
        line = gan(a.recipe, a.seed, a.include)
    else:
        line = recurrent(a.recipe, a.norm, a.seed)
    print(f"RESULT {line} time={time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
