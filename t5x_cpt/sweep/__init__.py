"""Sweeps: a study's grid of runs — sizes x budgets x {scratch, cpt} x target languages x replay —
expanded into ordinary training runs, trained one after another (resumably) or printed as launch
commands for a cluster, then analysed with the scaling toolkit (docs/study.md).

    python -m t5x_cpt.sweep --gin_file=configs/sweeps/NAME.gin [--dry_run | --print_commands |
        --analyse_only] [--only=REGEX] [--output_dir=DIR] [--gin.NAME=VALUE ...]

Modules (one concern each):
  spec       the sweep file: the gin-configurable `Sweep`, its validation
  plan       the grid expanded into runs: names, MODEL_DIRs, gin files, bindings, commands
  configure  each run's gin config built without training: steps, N, FLOPs, identity, ladder check
  execute    finished / unfinished, directory and source checks, the run loop, progress and ETA
  analyse    run table, scaling analyses, plots; report (report.md)
  cost       FLOPs by kind and size, TPU slice per size, hours at an assumed MFU
  cli        the command line
"""

from t5x_cpt.sweep.spec import Sweep, SweepError, read_sweep

__all__ = ["Sweep", "SweepError", "read_sweep"]
