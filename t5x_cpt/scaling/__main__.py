"""`python -m t5x_cpt.scaling`: see t5x_cpt/scaling/cli.py and docs/scaling.md."""
import sys

from t5x_cpt.scaling.cli import main

if __name__ == "__main__":
    sys.exit(main())
