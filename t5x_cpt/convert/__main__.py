"""Command line: `python -m t5x_cpt.convert {import,export,extend_vocab} --flag=value ...`.

Plain flags (no gin): conversion is a tool, not a run. Bad input (a ConversionError or a
CheckpointError, both UserInputErrors) prints one line naming the cause and exits with status 2;
anything else is a bug and ends in a traceback (docs/errors.md). No partial output directory is
left behind either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from t5x_cpt import errors
from t5x_cpt.convert.export import export_checkpoint
from t5x_cpt.convert.importer import import_checkpoint
from t5x_cpt.convert.vocab_extension import extend_vocabulary


def _paths(value: str) -> list[str]:
    return [p for p in value.split(",") if p]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m t5x_cpt.convert",
                                     description="Import/export source LLM checkpoints; extend vocabularies.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="Hugging Face dir or .gguf -> t5x_cpt checkpoint DIR")
    p.add_argument("--source", required=True, help="HF model directory (config.json + weights) or a .gguf file")
    p.add_argument("--out", required=True, help="output DIR (must not exist unless --overwrite)")
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer files, instead of the source's")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="storage dtype of the weights (default: as stored; GGUF: float32)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("export", help="t5x_cpt DIR or MODEL_DIR -> Hugging Face directory")
    p.add_argument("--checkpoint", required=True, help="imported DIR or training MODEL_DIR")
    p.add_argument("--step", type=int, default=None, help="MODEL_DIR step (default: latest)")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: from the origin DIR)")
    p.add_argument("--architecture", default=None, choices=["llama", "mistral", "qwen2"],
                   help="HF architecture to write (default: the source's; qwen2 if QKV bias else llama)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max_shard_gb", type=float, default=5.0)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("extend_vocab", help="add target-language tokens; resize embeddings")
    p.add_argument("--checkpoint", required=True, help="imported DIR or training MODEL_DIR")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--target_text", required=True, type=_paths, help="comma-separated UTF-8 text files to learn from")
    p.add_argument("--num_new_tokens", required=True, type=int)
    p.add_argument("--eval_text", default=None, type=_paths, help="held-out target text for bytes/token")
    p.add_argument("--source_eval_text", default=None, type=_paths, help="source-language text for bytes/token")
    p.add_argument("--init", default="subword_mean", choices=["subword_mean", "mean"])
    p.add_argument("--pad_to_multiple_of", type=int, default=1)
    p.add_argument("--min_frequency", type=int, default=2)
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: from the origin DIR)")
    p.add_argument("--overwrite", action="store_true")
    return parser


def run(args: argparse.Namespace) -> int:
    """Runs one parsed command; bad input raises a UserInputError (ConversionError, CheckpointError)."""
    if args.command == "import":
        out = import_checkpoint(args.source, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
                                overwrite=args.overwrite)
        print(f"imported {args.source} -> {out}  (use --gin_file={out}/model.gin "
              f"--gin.SOURCE_CHECKPOINT=\"'{out}'\")")
    elif args.command == "export":
        out = export_checkpoint(args.checkpoint, args.out, step=args.step, tokenizer=args.tokenizer,
                                architecture=args.architecture, dtype=args.dtype, overwrite=args.overwrite,
                                max_shard_gb=args.max_shard_gb)
        print(f"exported {args.checkpoint} -> {out}")
    else:
        report = extend_vocabulary(args.checkpoint, args.out, args.target_text, args.num_new_tokens,
                                   eval_text=args.eval_text, source_eval_text=args.source_eval_text,
                                   init=args.init, pad_to_multiple_of=args.pad_to_multiple_of,
                                   min_frequency=args.min_frequency, step=args.step, tokenizer=args.tokenizer,
                                   overwrite=args.overwrite)
        print(json.dumps({k: v for k, v in report.items() if k != "examples"}, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m t5x_cpt.convert ...`: 0 when done, 2 with one line on stderr for bad input (docs/errors.md)."""
    args = build_parser().parse_args(argv)
    # Our own progress at INFO; libraries (orbax, absl) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("t5x_cpt").setLevel(logging.INFO)
    return errors.run_command(f"t5x_cpt.convert {args.command}", lambda _: run(args))


if __name__ == "__main__":
    sys.exit(main())
