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

import jax

from t5x_cpt import errors, flops, gin_cli
from t5x_cpt.model import ModelConfig, abstract_params


def describe(config: ModelConfig, sequence_length: int) -> dict:
    """Parameter counts, FLOPs per token and the architecture of `config`."""
    counts = flops.param_counts(config)
    traced = sum(int(x.size) for x in jax.tree.leaves(abstract_params(config)))
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


def run(argv) -> int:
    """Parses gin and flags, prints the JSON; bad input raises a UserInputError."""
    rest = gin_cli.parse_argv(argv)
    parser = argparse.ArgumentParser(prog="python -m t5x_cpt.model_info")
    parser.add_argument("--sequence_length", type=int, default=2048)
    args = parser.parse_args(rest)
    print(json.dumps(describe(ModelConfig(), args.sequence_length), indent=2))
    return 0


def main(argv=None) -> int:
    """0 when done; 2 with one line on stderr for a bad gin file, binding or size (docs/errors.md)."""
    return errors.run_command("t5x_cpt.model_info", run, argv)


if __name__ == "__main__":
    sys.exit(main())
