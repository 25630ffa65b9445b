"""Prints one JSON object describing a model config: parameter counts and training FLOPs per token.

    python -m t5x_cpt.model_info --gin_file=configs/models/ladder_1393m.gin [--gin.NAME=VALUE] \
        [--sequence_length=2048]

Counts come from `t5x_cpt.flops` (the project's one definition) and are checked against the
parameters of the real model, traced abstractly (no memory is allocated, so any size works).
"""

from __future__ import annotations

import argparse
import json
import sys

from t5x_cpt import flops, gin_cli
from t5x_cpt.model import Decoder, ModelConfig


def describe(config: ModelConfig, sequence_length: int) -> dict:
    """Parameter counts, FLOPs per token and the architecture of `config`."""
    import jax
    import jax.numpy as jnp

    counts = flops.param_counts(config)
    abstract = jax.eval_shape(Decoder(config).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    traced = sum(int(x.size) for x in jax.tree.leaves(abstract))
    if traced != counts["params"]:
        raise AssertionError(f"flops.param_counts says {counts['params']} but the model has {traced} parameters")
    return {
        **counts,
        "params_millions": counts["params"] / 1e6,
        "sequence_length": sequence_length,
        "train_flops_per_token": flops.train_flops_per_token(config, sequence_length),
        "train_flops_per_token_6n": 6.0 * counts["params"],
        "config": config.to_dict(),
    }


def main(argv=None) -> int:
    try:
        rest = gin_cli.parse_argv(argv)
    except gin_cli.GinConfigError as e:
        print(f"model_info: {e}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m t5x_cpt.model_info")
    parser.add_argument("--sequence_length", type=int, default=2048)
    args = parser.parse_args(rest)
    try:
        config = ModelConfig()
    except ValueError as e:
        print(f"model_info: {e}", file=sys.stderr)
        return 2
    print(json.dumps(describe(config, args.sequence_length), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
