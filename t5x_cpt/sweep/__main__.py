"""`python -m t5x_cpt.sweep` (t5x_cpt/sweep/cli.py)."""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow (under seqio) is chatty on import

from t5x_cpt.sweep.cli import main  # noqa: E402

sys.exit(main())
