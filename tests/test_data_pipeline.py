"""The train/eval input pipeline on synthetic corpora written into a temp cache: seqio feature format,
exact token ratios with very different document lengths, resume, per-host sharding, determinism,
evaluation batches, user files, TFDS (mock_data), bad input. Real seqio everywhere."""

import json
import re

import gin
import numpy as np
import pytest

from t5x_cpt.data import mixtures, packing, pipeline, stats, tasks, testing
from t5x_cpt.data.errors import DataError
from t5x_cpt.data.tfutil import seqio

L, B = 128, 4
N_EN, N_ZH, N_FR = 40, 300, 80


def _marker(lang, split, i):
    return f"<{lang}:{split}{i}>"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """lo_help en: long documents (~3-6 kB); zh: short ones (~40 bytes); fr: medium. Each document
    starts with a marker naming it, so batches can be traced back to documents."""
    d = str(tmp_path_factory.mktemp("pipeline_cache"))
    rng = np.random.default_rng(1)
    words = {"en": (500, 1000), "zh": (2, 8), "fr": (50, 150)}
    counts = {"en": N_EN, "zh": N_ZH, "fr": N_FR}
    for lang in ("en", "zh", "fr"):
        def doc(split, i):
            return _marker(lang, split, i) + testing.synthetic_text(lang, rng, int(rng.integers(*words[lang])))
        testing.write_corpus(d, "lo_help", lang, [doc("t", i) for i in range(counts[lang])],
                             [doc("v", i) for i in range(max(5, counts[lang] // 8))])
    return d


def _pipe(data_dir, name, seed=0, shard=(0, 1), batch=B, length=L, **kw):
    return pipeline.make_train_pipeline(name, length, batch, seed=seed, shard_info=seqio().ShardInfo(*shard),
                                        data_dir=data_dir, **kw)


def _markers(batch) -> set:
    """Markers of the documents whose first piece is in this batch (byte vocabulary)."""
    out = set()
    for row, seg, pos in zip(batch["decoder_target_tokens"], batch["decoder_segment_ids"], batch["decoder_positions"]):
        text = bytes(int(t) - 3 for t in row if t >= 3).decode("utf-8", errors="ignore")
        out |= set(re.findall(r"<(?:en|zh|fr):[tv]\d+>", text))
    return out


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_format_is_seqio_decoder_feature_converter(data_dir):
    pipe = _pipe(data_dir, "replay:lo_help_zh+lo_help_en@0.3")
    assert pipe.task_names == ["lo_help_zh", "lo_help_en"]
    batches = [next(pipe) for _ in range(4)]
    rows = []
    for batch in batches:
        assert set(batch) == set(packing.FEATURES) | {"task_ids"}
        assert all(v.shape == (B, L) and v.dtype == np.int32 for v in batch.values())
        for r in range(B):
            seg = batch["decoder_segment_ids"][r]
            rows.append([batch["decoder_target_tokens"][r][seg == s] for s in range(1, seg.max() + 1)])
            for s in range(1, seg.max() + 1):  # every token of a segment comes from one task
                assert len(set(batch["task_ids"][r][seg == s])) == 1
    assert max(len(r) for r in rows) > 1  # some rows do hold several segments
    ref = testing.pack_rows_with_seqio(rows, L)  # seqio.DecoderFeatureConverter(pack=True) itself
    for k in packing.FEATURES:
        np.testing.assert_array_equal(np.concatenate([b[k] for b in batches]), ref[k], err_msg=k)


def test_replay_ratio_is_exact_in_tokens_despite_very_different_lengths(data_dir):
    pipe = _pipe(data_dir, "replay:lo_help_zh+lo_help_en@0.3")
    m = stats.measure(pipe, 60)
    assert m["fill"] == 1.0
    assert abs(m["tokens_per_task"]["lo_help_en"] - 0.3) < 0.01, m
    assert abs(sum(m["tokens_per_task"].values()) - 1) < 1e-9
    # The same shares, realised by the pipeline's own counters (what it logs).
    assert abs(pipe.token_shares()[1] - 0.3) < 0.01


def test_seqio_mixture_under_the_name_gives_the_same_token_shares(data_dir):
    """seqio's own tooling, shuffled, at two feature lengths: the registered Mixture mixes by tokens."""
    registered = mixtures.register("replay:lo_help_zh+lo_help_en@0.3", data_dir=data_dir)
    mix = seqio().get_mixture_or_task(registered.spec.seqio_name)
    for length in (64, 128):
        ds = mix.get_dataset({"targets": length}, split="train", shuffle=True, seed=0)
        assert abs(testing.ascii_token_share(ds, 20000, length) - 0.3) < 0.02, length
    # The premise: example rates equal to the token weights put most tokens on the long-document task.
    naive = seqio().Mixture("naive_rates", [(t.name, w) for t, w in zip(registered.tasks, (0.7, 0.3))])
    ds = naive.get_dataset({"targets": 128}, split="train", shuffle=True, seed=0)
    assert testing.ascii_token_share(ds, 5000, 128) > 0.5


def test_tasks_cut_documents_at_the_feature_length_and_keep_every_token(data_dir):
    info = tasks.register_task("lo_help_en", data_dir=data_dir)
    _, _, lengths = pipeline.streams.load_documents("lo_help_en", "train", 0, 1, info)
    task = seqio().get_mixture_or_task("lo_help_en")
    pieces = [len(ex["targets"]) for ex in task.get_dataset({"targets": L}, split="train", shuffle=False)
              .as_numpy_iterator()]
    assert sum(pieces) == int(lengths.sum()) and max(pieces) == L
    assert len(pieces) == int(np.ceil(lengths / L).sum())
    assert len(list(task.get_dataset({"targets": L}, split="train", shuffle=True, seed=1).take(5))) == 5


def test_ratio_schedule_and_zero_ratio(data_dir):
    pipe = _pipe(data_dir, "replay:lo_help_zh+lo_help_en@0:0.6,20:0.1")
    first = stats.measure(pipe, 20)["tokens_per_task"]["lo_help_en"]
    for _ in range(10):
        next(pipe)
    late = stats.measure(pipe, 60)["tokens_per_task"]["lo_help_en"]
    assert 0.3 < first < 0.6 and abs(late - 0.1) < 0.02, (first, late)
    pipe = _pipe(data_dir, "replay:lo_help_zh+lo_help_en@0.0")
    m = stats.measure(pipe, 10)
    assert m["token_counts"]["lo_help_en"] == 0 and pipe.task_names == ["lo_help_zh", "lo_help_en"]


def test_multiple_targets_and_generic_mix(data_dir):
    m = stats.measure(_pipe(data_dir, "replay:lo_help_zh,lo_help_fr+lo_help_en@0.2"), 60)["tokens_per_task"]
    assert abs(m["lo_help_en"] - 0.2) < 0.01 and abs(m["lo_help_zh"] - 0.4) < 0.01 and abs(m["lo_help_fr"] - 0.4) < 0.01
    m = stats.measure(_pipe(data_dir, "mix:lo_help_fr@0.5,lo_help_zh@0.25,lo_help_en@0.25"), 60)["tokens_per_task"]
    assert abs(m["lo_help_fr"] - 0.5) < 0.01 and abs(m["lo_help_zh"] - 0.25) < 0.01


def test_register_returns_what_it_registered(data_dir):
    first = mixtures.register("replay:lo_help_zh+lo_help_en@0.25", data_dir=data_dir)
    assert [t.name for t in first.tasks] == ["lo_help_zh", "lo_help_en"] and first.tasks[0].kind == "cache"
    again = mixtures.register("replay:lo_help_zh+lo_help_en@0.25", data_dir=data_dir)  # re-registering: fine
    assert again == first
    mix = seqio().get_mixture_or_task("replay:lo_help_zh_lo_help_en_0.25")
    assert mix.rate_per_task_name == {"lo_help_zh": 0.75, "lo_help_en": 0.25}  # token weights
    assert mixtures.register("lo_help_fr", data_dir=data_dir).spec.weights == (1.0,)


@pytest.mark.parametrize("k", [0, 5, 23])
def test_resume_gives_the_next_batch_exactly(data_dir, k):
    name = "replay:lo_help_zh+lo_help_en@0.3"
    a = _pipe(data_dir, name, seed=3)
    for _ in range(k):
        next(a)
    state = json.loads(json.dumps(a.get_state()))  # what a checkpoint stores
    assert len(json.dumps(state)) < 2000
    b = _pipe(data_dir, name, seed=3)
    next(b)  # b has moved on: set_state must rewind it
    b.set_state(state)
    for _ in range(3):
        assert _equal(next(a), next(b))
    assert a.token_counts == b.token_counts


def test_resume_across_epochs(data_dir):
    a = _pipe(data_dir, "lo_help_zh", seed=1)
    epochs = set()
    for _ in range(60):  # the zh train split is ~12 kB: several epochs of 512-token batches
        next(a)
        epochs.add(a.get_state()["streams"][0]["epoch"])
    assert len(epochs) > 2
    state = a.get_state()
    b = _pipe(data_dir, "lo_help_zh", seed=1)
    b.set_state(state)
    assert _equal(next(a), next(b))


def test_deterministic_given_seed(data_dir):
    name = "replay:lo_help_zh+lo_help_en@0.3"
    a, b, c = _pipe(data_dir, name, seed=7), _pipe(data_dir, name, seed=7), _pipe(data_dir, name, seed=8)
    ba, bb, bc = next(a), next(b), next(c)
    assert _equal(ba, bb) and not _equal(ba, bc)


def test_shards_read_disjoint_documents(data_dir):
    seen = []
    for index in range(2):
        pipe = _pipe(data_dir, "lo_help_zh", shard=(index, 2), batch=2 * B)
        assert pipe.local_batch == B
        markers = set()
        for _ in range(60):  # > one epoch of the shard
            markers |= _markers(next(pipe))
        seen.append(markers)
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == {_marker("zh", "t", i) for i in range(N_ZH)}


def test_eval_batches(data_dir):
    def make(batch, num=None, shard=(0, 1)):
        return pipeline.make_eval_batches("lo_help_en", L, batch, num, shard_info=seqio().ShardInfo(*shard),
                                          data_dir=data_dir)

    rows = len(make(1))
    G = next(g for g in (2, 4, 6, 8, 10) if rows % g)  # a batch size that leaves the last batch partial
    evals, again = make(G), make(G)
    assert len(evals) == -(-rows // G)
    assert len(evals) == len(again) and all(_equal(x, y) for x, y in zip(evals, again))
    tokens, _, lengths = pipeline.streams.load_documents(
        "lo_help_en", "validation", 0, 1, tasks.register_task("lo_help_en", data_dir=data_dir))
    assert sum(int(b["decoder_loss_weights"].sum()) for b in evals) == int(lengths.sum())  # nothing dropped
    last = evals[-1]["decoder_loss_weights"]
    assert last.sum(axis=1).min() == 0  # padding rows carry no loss
    markers = set().union(*map(_markers, evals))
    assert markers == {_marker("en", "v", i) for i in range(5)}
    # two hosts: same number of batches, each host its rows, together the single-host batches
    halves = [make(G, shard=(i, 2)) for i in range(2)]
    assert len(halves[0]) == len(halves[1]) == len(evals)
    for full, h0, h1 in zip(evals, *halves):
        assert h0["decoder_target_tokens"].shape == (G // 2, L)
        for k in full:
            np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), full[k])
    two = make(G, 2)
    assert len(two) == 2 and _equal(two[1], evals[1])


def test_user_files_streaming_resume_and_bad_lines(data_dir, tmp_path):
    rng = np.random.default_rng(5)
    short = [f"<s:{i}>" + testing.synthetic_text("fr", rng, 3) for i in range(300)]
    long = [f"<l:{i}>" + testing.synthetic_text("en", rng, 400) for i in range(30)]
    testing.write_jsonl(str(tmp_path / "s" / "train-0.jsonl"), short[:150])
    testing.write_jsonl(str(tmp_path / "s" / "train-1.jsonl"), short[150:])
    with open(tmp_path / "s" / "train-1.jsonl", "ab") as f:
        f.write(b"\xff\xfe not utf-8\n{bad json\n")
    testing.write_jsonl(str(tmp_path / "s" / "val.jsonl"), short[:10])
    (tmp_path / "long.txt").write_text("\n".join(long) + "\n", encoding="utf-8")
    gin.bind_parameter("user_file_tasks.tasks", {
        "short_fr": {"lang": "fr", "train": str(tmp_path / "s" / "train-*.jsonl"),
                     "validation": str(tmp_path / "s" / "val.jsonl")},
        "long_en": {"lang": "en", "train": str(tmp_path / "long.txt"), "validation": str(tmp_path / "long.txt"),
                    "format": "text"}})
    name = "replay:short_fr+long_en@0.3"
    a = _pipe(data_dir, name, seed=2)
    m = stats.measure(a, 30)
    assert abs(m["tokens_per_task"]["long_en"] - 0.3) < 0.01
    state = a.get_state()
    assert state["streams"][0]["epoch"] >= 1  # wrapped around the short files at least once
    b = _pipe(data_dir, name, seed=2)
    b.set_state(state)
    for _ in range(3):
        assert _equal(next(a), next(b))
    ev = pipeline.make_eval_batches("short_fr", L, B, shard_info=seqio().ShardInfo(0, 1), data_dir=data_dir)
    assert sum(int(x["decoder_loss_weights"].sum()) for x in ev) == sum(len(t.encode()) + 1 for t in short[:10])
    # two hosts, two files: one file each
    seen = [set(), set()]
    for i in range(2):
        p = _pipe(data_dir, "short_fr", shard=(i, 2), batch=2 * B)
        for _ in range(25):
            for row in next(p)["decoder_target_tokens"]:
                seen[i] |= set(re.findall(r"<s:\d+>", bytes(int(t) - 3 for t in row if t >= 3).decode(errors="ignore")))
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_tfds_path_with_mock_data(data_dir):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=40):
        a = _pipe(data_dir, "c4_en", seed=0)
        assert a.task_names == ["c4_en"]
        for _ in range(3):
            batch = next(a)
        assert batch["decoder_loss_weights"].sum() == B * L
        state = a.get_state()
        b = _pipe(data_dir, "c4_en", seed=0)
        b.set_state(state)
        assert _equal(next(a), next(b))
        m = stats.measure(_pipe(data_dir, "replay:mc4_zh+c4_en@0.3"), 10)
        assert abs(m["tokens_per_task"]["c4_en"] - 0.3) < 0.03
        ev = pipeline.make_eval_batches("c4_en", L, B, num_batches=2, shard_info=seqio().ShardInfo(0, 1))
        assert len(ev) == 2
        assert next(_pipe(data_dir, "wiki40b_fr"))["decoder_loss_weights"].all()


def test_wiki40b_markers_are_removed():
    from t5x_cpt.data import tasks
    from t5x_cpt.data.tfutil import tf

    raw = "_START_ARTICLE_\nParis\n_START_SECTION_\nHistoire\n_START_PARAGRAPH_\nLigne un._NEWLINE_Ligne deux."
    ds = tasks._clean_wiki40b(tf().data.Dataset.from_tensors({"targets": tf().constant(raw)}))
    assert next(ds.as_numpy_iterator())["targets"].decode() == "Paris\nHistoire\nLigne un.\nLigne deux."


def test_logs_realised_token_shares(data_dir, caplog):
    pipe = _pipe(data_dir, "replay:lo_help_zh+lo_help_en@0.3", log_every=2)
    with caplog.at_level("INFO", logger="t5x_cpt.data.pipeline"):
        next(pipe), next(pipe)
    assert "realised token shares after 2 batches" in caplog.text and "lo_help_en" in caplog.text


@pytest.mark.parametrize("name,match", [
    ("replay:lo_help_zh+lo_help_en@1.0", r"outside \[0, 1\)"),
    ("replay:lo_help_zh+lo_help_en@-0.1", r"outside \[0, 1\)"),
    ("replay:lo_help_zh+lo_help_en@abc", "not a number"),
    ("replay:lo_help_zh@0.3", "not 'replay:TARGET"),
    ("replay:lo_help_en+lo_help_en@0.3", "appears twice"),
    ("mix:lo_help_zh@0.5,lo_help_en@0.6", "sum to"),
    ("lo_help_xx", "unknown language 'xx'"),
    ("wikipedia_en", "unknown corpus 'wikipedia'"),
    ("lo_help_ko", r"not prepared .*prepare --corpora=lo_help --languages=ko"),
    ("pydoc_zh", "has no language 'zh'"),
])
def test_bad_names(data_dir, name, match):
    with pytest.raises(DataError, match=match):
        _pipe(data_dir, name)


def test_bad_arguments_and_states(data_dir, tmp_path):
    with pytest.raises(DataError, match="not divisible"):
        _pipe(data_dir, "lo_help_en", shard=(0, 3), batch=4)
    with pytest.raises(DataError, match="sequence_length"):
        _pipe(data_dir, "lo_help_en", length=0)
    with pytest.raises(DataError, match=r"replay ratio .* outside"):
        mixtures.replay_mixture("lo_help_zh", "lo_help_en", ratio=1.5)
    with pytest.raises(DataError, match="not prepared"):
        _pipe(str(tmp_path / "empty"), "lo_help_en")
    a = _pipe(data_dir, "replay:lo_help_zh+lo_help_en@0.3")
    b = _pipe(data_dir, "replay:lo_help_zh+lo_help_en@0.2")
    with pytest.raises(DataError, match="mixture="):
        b.set_state(a.get_state())
    with pytest.raises(DataError, match="not a data pipeline state"):
        b.set_state({"step": 3})


def test_replay_mixture_gin_helper(data_dir):
    gin.parse_config("""
        REPLAY_RATIO = 0.25
        make_train_pipeline.mixture_or_task_name = @replay_mixture()
        replay_mixture.target = 'lo_help_zh'
        replay_mixture.source = 'lo_help_en'
        replay_mixture.ratio = %REPLAY_RATIO
        make_train_pipeline.sequence_length = 128
        make_train_pipeline.batch_size = 4
    """)
    pipe = pipeline.make_train_pipeline(shard_info=seqio().ShardInfo(0, 1), data_dir=data_dir)
    assert pipe.spec.name == "replay:lo_help_zh+lo_help_en@0.25"
