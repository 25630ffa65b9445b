"""Input pipeline throughput (packed tokens / s / host) next to what the demo model's train step consumes.

    python benchmarks/data_pipeline.py [--mixture='replay:lo_help_zh+lo_help_en@0.3'] [--seq=256] [--batch=8]
        [--batches=300] [--vocabulary=byte] [--model_steps=20] [--no_model]

Pipeline: t5x_cpt.data.pipeline.make_train_pipeline on the prepared corpora (run
`python -m t5x_cpt.data prepare --corpora=lo_help --languages=en,zh,fr` first), this host = 1 of 1.
Setup (TF import, tokenization) is reported separately from steady-state batch production; the
figure that matters is steady state, measured at the demo's shape and at a paper-like shape
(sequence 2048, 16 rows per host). `pipeline_streaming` is the path used for TFDS and user files
(documents read and tokenized on the fly by tf.data), measured on the same text.

Model (`measure_model_consumption`, the hook): the real jitted train step (t5x_cpt.trainer) of
the demo model (configs/models/demo.gin + configs/experiments/demo_budget.gin) on real batches of
the same pipeline; tokens per second it consumes. If the model code is unavailable, that part
reports why and the pipeline figures stand alone.

Prints one JSON object: the pipeline rate, the model rate, their ratio (target >= 10) and the
pipeline rate as a fraction of 1M tokens/s/host (levanter's figure).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
LEVANTER_TOKENS_PER_SECOND = 1_000_000


def measure_pipeline(mixture: str, seq: int, batch: int, batches: int) -> dict:
    from t5x_cpt.data import pipeline
    from t5x_cpt.data.tfutil import seqio

    t0 = time.perf_counter()
    pipe = pipeline.make_train_pipeline(mixture, seq, batch, seed=0, shard_info=seqio().ShardInfo(0, 1),
                                        log_every=0)
    next(pipe)
    setup = time.perf_counter() - t0
    tokens = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        tokens += int(next(pipe)["decoder_loss_weights"].sum())
    seconds = time.perf_counter() - t0
    return {"sequence_length": seq, "batch_size_per_host": batch, "batches": batches,
            "setup_seconds": round(setup, 2), "tokens_per_second_per_host": tokens / seconds,
            "token_shares": dict(zip(pipe.task_names, [round(s, 4) for s in pipe.token_shares()]))}


def measure_model_consumption(mixture: str, seq: int, batch: int, steps: int) -> dict:
    """Tokens/s the demo model's train step consumes on this machine (the benchmark's model hook)."""
    import jax
    import numpy as np

    from t5x_cpt import gin_cli, optim, partitioning, trainer
    from t5x_cpt.data import pipeline
    from t5x_cpt.data.tfutil import seqio
    from t5x_cpt.model import Decoder, ModelConfig

    gin_cli.parse(["configs/models/demo.gin", "configs/experiments/demo_budget.gin"], [], skip_unknown=True,
                  finalize=False)
    config = ModelConfig()
    model = Decoder(config)
    optimizer = optim.make_optimizer(optim.learning_rate_schedule(1000))
    mesh = partitioning.make_mesh()
    pipe = pipeline.make_train_pipeline(mixture, seq, batch, seed=0, shard_info=seqio().ShardInfo(0, 1), log_every=0)
    with partitioning.activation_sharding(mesh):
        _, shardings = trainer.state_shardings(model, optimizer, mesh)
        state = trainer.init_state(trainer.random_params(model, 0, shardings.params), optimizer, shardings)
        step = jax.jit(trainer.make_train_step(model, optimizer, len(pipe.task_names)), donate_argnums=(0, 1))
        sharding = partitioning.batch_sharding(mesh)
        batches = [{k: jax.device_put(np.asarray(v), sharding) for k, v in next(pipe).items()}
                   for _ in range(min(steps, 8))]
        acc = trainer.zero_accumulators(len(pipe.task_names))
        t0 = time.perf_counter()
        state, acc = step(state, acc, batches[0])
        jax.block_until_ready(acc)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(steps):
            state, acc = step(state, acc, batches[i % len(batches)])
        jax.block_until_ready(acc)
        seconds = (time.perf_counter() - t0) / steps
    return {"model": "demo", "d_model": config.d_model, "num_layers": config.num_layers,
            "vocab_size": config.vocab_size, "step_seconds": seconds, "compile_seconds": round(compile_s, 2),
            "tokens_per_second": batch * seq / seconds, "device": jax.devices()[0].device_kind,
            "devices": jax.device_count()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixture", default="replay:lo_help_zh+lo_help_en@0.3")
    parser.add_argument("--seq", type=int, default=256, help="the demo's sequence length")
    parser.add_argument("--batch", type=int, default=8, help="the demo's batch size")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--vocabulary", default="byte")
    parser.add_argument("--model_steps", type=int, default=20)
    parser.add_argument("--no_model", action="store_true")
    parser.add_argument("--synthetic", action="store_true",
                        help="use a synthetic lo_help en/zh/fr cache in a temp dir (machines without the corpora)")
    args = parser.parse_args()
    os.chdir(REPO)
    if args.synthetic:
        import tempfile

        import numpy as np

        from t5x_cpt.data import cache, testing

        os.environ[cache.ENV_VAR] = tempfile.mkdtemp(prefix="t5x_cpt_bench_")
        rng = np.random.default_rng(0)
        for lang, words in (("en", 200), ("zh", 300), ("fr", 200)):
            docs = [testing.synthetic_text(lang, rng, int(rng.integers(words // 4, words))) for _ in range(3000)]
            testing.write_corpus(os.environ[cache.ENV_VAR], "lo_help", lang, docs[:2800], docs[2800:])
    import gin

    from t5x_cpt.data import pipeline  # noqa: F401  (registers the data configurables)

    gin.bind_parameter("get_vocabulary.name", args.vocabulary)
    result = {"mixture": args.mixture, "vocabulary": args.vocabulary, "host_cpus": os.cpu_count()}
    result["pipeline"] = measure_pipeline(args.mixture, args.seq, args.batch, args.batches)
    result["pipeline_paper_shape"] = measure_pipeline(args.mixture, 2048, 16, max(args.batches // 8, 20))
    # The streaming path (TFDS / user files: tokenized on the fly by tf.data), on the same text.
    from t5x_cpt.data import cache, mixtures

    spec = mixtures.parse(args.mixture)
    files = {}
    for task in spec.task_names:
        corpus, _, lang = task.rpartition("_")
        files[f"stream_{lang}"] = {"lang": lang, "train": cache.split_path(corpus, lang, "train"),
                                   "validation": cache.split_path(corpus, lang, "validation")}
    gin.bind_parameter("user_file_tasks.tasks", files)
    streaming = args.mixture
    for task in spec.task_names:
        streaming = streaming.replace(task, f"stream_{task.rpartition('_')[2]}")
    result["pipeline_streaming"] = measure_pipeline(streaming, 2048, 16, max(args.batches // 3, 40))
    rate = result["pipeline"]["tokens_per_second_per_host"]
    result["fraction_of_1M_tokens_per_s"] = rate / LEVANTER_TOKENS_PER_SECOND
    if not args.no_model:
        try:
            result["model_consumption"] = measure_model_consumption(args.mixture, args.seq, args.batch,
                                                                    args.model_steps)
            result["pipeline_over_model"] = rate / result["model_consumption"]["tokens_per_second"]
            result["meets_10x_target"] = result["pipeline_over_model"] >= 10
        except Exception as e:  # the model hook is optional: report why it could not run
            result["model_consumption"] = {"unavailable": f"{type(e).__name__}: {e}"[:500]}
    from t5x_cpt.data.tfutil import tf

    result["tf_visible_gpus"] = len(tf().config.get_visible_devices("GPU"))  # must be 0: JAX owns them
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
