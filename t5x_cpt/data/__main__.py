"""Command line of the data package.

  python -m t5x_cpt.data prepare --corpora=lo_help[,pydoc,...] [--languages=en,zh,fr] [--data_dir=D] [--force]
  python -m t5x_cpt.data train_vocab --corpora=lo_help --languages=en,zh,fr --vocab_size=8000 [--name=N]
  python -m t5x_cpt.data vocab_report [--vocabulary=byte|sentencepiece:PATH|hf:PATH] --corpora=lo_help --languages=en,zh,fr
  python -m t5x_cpt.data distance [--vocabulary=byte|...] --corpora=lo_help --source=en --languages=fr,zh,...
  python -m t5x_cpt.data stats --gin_file=F [--gin.NAME=VALUE ...] --batches=K
  python -m t5x_cpt.data list [--data_dir=D]

Every failure caused by bad input prints one line `t5x_cpt.data <command>: error: <cause>` and exits
with status 2; anything else is a traceback and status 1 (docs/errors.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from t5x_cpt import errors


def _prepare(args) -> None:
    from t5x_cpt.data import corpora  # pylint: disable=g-import-not-at-top

    result = corpora.prepare(args.corpora.split(","), args.languages, args.data_dir, force=args.force)
    summary = {c: {lang: {s: e[s]["documents"] for s in ("train", "validation")}
                   for lang, e in m["languages"].items()} for c, m in result.items()}
    print(json.dumps({"data_dir": _data_dir(args), "documents": summary}))


def _train_vocab(args) -> None:
    from t5x_cpt.data import vocab_training  # pylint: disable=g-import-not-at-top

    report = vocab_training.train_vocab(
        corpora=args.corpora.split(","), languages=args.languages, vocab_size=args.vocab_size,
        name=args.name, sample_bytes_per_language=args.sample_bytes_per_language,
        data_dir=args.data_dir, model_type=args.model_type, force=args.force)
    print(json.dumps(report))


def _vocab_report(args) -> None:
    from t5x_cpt.data import vocab_training, vocabularies  # pylint: disable=g-import-not-at-top

    vocab = vocabularies.vocabulary_from_spec(args.vocabulary, data_dir=args.data_dir)
    report = vocab_training.bytes_per_token(vocab, args.corpora.split(","), args.languages,
                                            data_dir=args.data_dir, max_bytes=args.max_bytes)
    print(json.dumps({"vocabulary": args.vocabulary, "vocab_size": vocab.vocab_size,
                      "bytes_per_token": report}))


def _distance(args) -> None:
    from t5x_cpt.data import distance, vocabularies  # pylint: disable=g-import-not-at-top

    vocab = vocabularies.vocabulary_from_spec(args.vocabulary, data_dir=args.data_dir)
    report = distance.language_distances(vocab, args.corpora.split(","), args.source, args.languages,
                                         data_dir=args.data_dir, max_bytes=args.max_bytes)
    print(json.dumps({"vocabulary": args.vocabulary, "source": args.source, "distances": report}, indent=1))


def _stats(args, gin_args) -> None:
    from t5x_cpt.data import stats  # pylint: disable=g-import-not-at-top

    print(json.dumps(stats.run_stats(gin_args, batches=args.batches)))


def _list(args) -> None:
    from t5x_cpt.data import cache, corpora  # pylint: disable=g-import-not-at-top

    out = {}
    for name, corpus in corpora.CORPORA.items():
        manifest = cache.read_manifest(name, args.data_dir) or {}
        out[name] = {"languages": list(corpus.languages),
                     "prepared": sorted(manifest.get("languages", {})), "description": corpus.description}
    print(json.dumps({"data_dir": _data_dir(args), "corpora": out}, indent=1))


def _data_dir(args) -> str:
    from t5x_cpt.data import cache  # pylint: disable=g-import-not-at-top

    return cache.resolve_data_dir(args.data_dir)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m t5x_cpt.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="fetch, clean, split and cache corpora")
    p.add_argument("--corpora", required=True)
    p.add_argument("--languages", default=None, help="comma-separated; default: all the corpus has")
    p.add_argument("--force", action="store_true", help="rebuild even if already prepared")

    p = sub.add_parser("train_vocab", help="train a SentencePiece model on prepared corpora")
    p.add_argument("--corpora", default="lo_help")
    p.add_argument("--languages", default="en,zh,fr")
    p.add_argument("--vocab_size", type=int, default=8000)
    p.add_argument("--name", default=None, help="default: spm_<corpora>_<langs>_<size>")
    p.add_argument("--sample_bytes_per_language", type=int, default=2_000_000)
    p.add_argument("--model_type", default="unigram", choices=("unigram", "bpe"))
    p.add_argument("--force", action="store_true", help="retrain even if the model exists")

    p = sub.add_parser("vocab_report", help="bytes per token per language of a vocabulary")
    p.add_argument("--vocabulary", default="byte")
    p.add_argument("--corpora", default="lo_help")
    p.add_argument("--languages", default="en,zh,fr")
    p.add_argument("--max_bytes", type=int, default=2_000_000)

    p = sub.add_parser("distance", help="how far each language is from the source, in the vocabulary's tokens")
    p.add_argument("--vocabulary", default="byte")
    p.add_argument("--corpora", default="lo_help")
    p.add_argument("--source", default="en")
    p.add_argument("--languages", default="fr,de,es,ru,ja,ko,zh")
    p.add_argument("--max_bytes", type=int, default=2_000_000)

    p = sub.add_parser("stats", help="realised token shares, throughput and fill of a run's input")
    p.add_argument("--batches", type=int, default=50)

    sub.add_parser("list", help="known corpora and what is prepared")

    for action in sub.choices.values():
        action.add_argument("--data_dir", default=None,
                            help="cache dir (default $T5X_CPT_DATA_DIR or ~/.cache/t5x_cpt)")
        action.add_argument("-v", "--verbose", action="store_true")

    gin_args = [a for a in argv if a.startswith("--gin") or (a == "--gin_file")]
    if "--gin_file" in argv:  # `--gin_file F` form: keep its value with it
        i = argv.index("--gin_file")
        gin_args = argv[i:i + 2] + [a for a in gin_args if a != "--gin_file"]
    rest = [a for a in argv if a not in gin_args]
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.data_dir:
        from t5x_cpt.data import cache  # pylint: disable=g-import-not-at-top

        os.environ[cache.ENV_VAR] = cache.resolve_data_dir(args.data_dir)
    if gin_args and args.command != "stats":
        parser.error(f"gin flags are only for `stats`: {gin_args}")
    commands = {"prepare": _prepare, "train_vocab": _train_vocab, "vocab_report": _vocab_report,
                "distance": _distance,
                "stats": lambda a: _stats(a, gin_args), "list": _list}
    return errors.run_command(f"t5x_cpt.data {args.command}", lambda _: commands[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
