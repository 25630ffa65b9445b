"""Data for cross-lingual continual pre-training: corpora, vocabularies, seqio tasks, replay mixtures,
packed resumable input. See docs/data.md.

Importing this package is cheap: TensorFlow and seqio are imported lazily, inside the functions that
need them. The trainer's entry points live in `t5x_cpt.data.pipeline`:

    from t5x_cpt.data.pipeline import make_train_pipeline, make_eval_batches
    from t5x_cpt.data.vocabularies import get_vocabulary, vocab_size
"""
