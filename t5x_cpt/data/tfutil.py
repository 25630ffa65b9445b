"""Lazy, quiet TensorFlow / seqio import.

TensorFlow is only ever an input-pipeline library here: it must not print noise, grab every CPU
thread, or take accelerator memory away from JAX. Import it through `tf()` / `seqio()`, inside
functions, never at module import time.
"""

from __future__ import annotations

import contextlib
import os
import sys

_TF = None


@contextlib.contextmanager
def _quiet_stderr():
    """Sends file descriptor 2 to /dev/null (unless T5X_CPT_TF_VERBOSE=1); Python errors still raise."""
    if os.environ.get("T5X_CPT_TF_VERBOSE") == "1" or "tensorflow" in sys.modules:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def tf():
    """The tensorflow module, configured once: no GPUs/TPUs, bounded threads, errors-only logs."""
    global _TF
    if _TF is None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        with _quiet_stderr():  # TF's C++ start-up lines ignore TF_CPP_MIN_LOG_LEVEL
            import tensorflow as tf_mod  # pylint: disable=g-import-not-at-top

            try:  # Never let TF see accelerators: JAX owns them.
                tf_mod.config.set_visible_devices([], "GPU")
                tf_mod.config.set_visible_devices([], "TPU")
            except (RuntimeError, ValueError):
                pass  # already initialised (someone imported TF first); nothing to do
        threads = int(os.environ.get("T5X_CPT_TF_THREADS", "0") or 0)
        if threads > 0:
            try:
                tf_mod.config.threading.set_intra_op_parallelism_threads(threads)
                tf_mod.config.threading.set_inter_op_parallelism_threads(threads)
            except RuntimeError:
                pass
        tf_mod.get_logger().setLevel("ERROR")
        _TF = tf_mod
    return _TF


def seqio():
    tf()
    import seqio as seqio_mod  # pylint: disable=g-import-not-at-top

    return seqio_mod
