"""Expected training throughput at an ASSUMED model FLOPs utilisation (MFU), from t5x_cpt/flops.py.

    python tpu_scripts/expected_throughput.py [--mfu=0.4] [--sequence_length=2048]
        [--models=ladder_125m,ladder_1393m,ladder_5534m]

tokens/s per chip = MFU x the chip's declared bf16 peak (flops.DECLARED_PEAK_FLOPS) / training FLOPs
per token (flops.train_flops_per_token: 6N + attention). Nothing is measured: the MFU is an input.
Prints two markdown tables (docs/tpu.md and docs/gpu.md show them): tokens/s per chip for each
device kind, and for whole slices/nodes the tokens/s and the hours to train on 20 tokens per
parameter (Chinchilla's compute-optimal ratio).
"""

from __future__ import annotations

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from t5x_cpt import flops, gin_cli  # noqa: E402

# Device kinds as JAX names them (the keys of flops.DECLARED_PEAK_FLOPS), with a short label.
DEVICES = (("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("TPU v5p", "v5p"), ("TPU v6 lite", "v6e"),
           ("NVIDIA A100", "A100"), ("NVIDIA H100", "H100"))
# Slices and nodes of the docs: (label, device kind, chips). Chips per slice follow the rule in
# tpu_scripts/common.sh: v4/v5p names count TensorCores (2 per chip), v5e/v6e names count chips.
SYSTEMS = (("v4-8", "TPU v4", 4), ("v5litepod-16", "TPU v5 lite", 16), ("v5p-32", "TPU v5p", 16),
           ("1x H100", "NVIDIA H100", 1), ("8x H100", "NVIDIA H100", 8), ("8x H200", "NVIDIA H200", 8))
TOKENS_PER_PARAM = 20


def model_numbers(model: str, sequence_length: int) -> tuple[int, float]:
    """(parameters, training FLOPs per token) of configs/models/<model>.gin."""
    import gin

    from t5x_cpt.model import ModelConfig

    gin.clear_config()
    gin_cli.parse([os.path.join(REPO_ROOT, "configs", "models", f"{model}.gin")], [])
    config = ModelConfig()
    gin.clear_config()
    return flops.param_counts(config)["params"], flops.train_flops_per_token(config, sequence_length)


def tokens_per_second_per_chip(flops_per_token: float, device_kind: str, mfu: float) -> float:
    """Tokens per second one chip trains at utilisation `mfu` of its declared peak."""
    peak = flops.declared_peak_flops(device_kind)
    if peak is None:
        raise ValueError(f"no declared peak for {device_kind!r} in t5x_cpt/flops.py")
    return mfu * peak / flops_per_token


def tables(models: list[str], mfu: float, sequence_length: int) -> str:
    """The two markdown tables (per chip; per slice or node)."""
    numbers = {m: model_numbers(m, sequence_length) for m in models}
    lines = [f"tokens/s per chip at an assumed MFU of {mfu:.0%} (sequence {sequence_length}):", "",
             "| model | params | train FLOPs/token | " + " | ".join(label for _, label in DEVICES) + " |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in DEVICES) + " |"]
    for m, (params, per_token) in numbers.items():
        cells = [f"{tokens_per_second_per_chip(per_token, kind, mfu):,.0f}" for kind, _ in DEVICES]
        lines.append(f"| {m} | {params / 1e6:,.0f}M | {per_token:.3e} | " + " | ".join(cells) + " |")
    lines += ["", f"whole slices / nodes at the same assumed MFU: tokens/s, and hours to train on "
              f"{TOKENS_PER_PARAM} tokens per parameter:", "",
              "| model | " + " | ".join(f"{label} ({chips} chips)" for label, _, chips in SYSTEMS) + " |",
              "| --- | " + " | ".join("---:" for _ in SYSTEMS) + " |"]
    for m, (params, per_token) in numbers.items():
        cells = []
        for _, kind, chips in SYSTEMS:
            rate = chips * tokens_per_second_per_chip(per_token, kind, mfu)
            hours = TOKENS_PER_PARAM * params / rate / 3600
            cells.append(f"{rate:,.0f} tok/s, {hours:,.1f} h")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tpu_scripts/expected_throughput.py", description=__doc__.split("\n")[0])
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation, in (0, 1]")
    parser.add_argument("--sequence_length", type=int, default=2048)
    parser.add_argument("--models", default="ladder_125m,ladder_1393m,ladder_5534m",
                        help="comma-separated names of configs/models/*.gin")
    args = parser.parse_args(argv)
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu={args.mfu} must be in (0, 1]")
    if args.sequence_length < 1:
        parser.error(f"--sequence_length={args.sequence_length} must be positive")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if not os.path.isfile(os.path.join(REPO_ROOT, "configs", "models", f"{m}.gin")):
            parser.error(f"--models: configs/models/{m}.gin does not exist")
    print(tables(models, args.mfu, args.sequence_length))
    return 0


if __name__ == "__main__":
    sys.exit(main())
