"""Scaling-law toolkit: robust fits of the Chinchilla and CPT laws, uncertainty, compute-optimal
allocation, savings, forgetting, a planner, plots and a CLI (docs/scaling.md).

Modules (one concern each):
  laws         the laws as declarative power-sum objects (+ published values)
  lbfgs        L-BFGS over thousands of independent starts at once (numpy, float64)
  fitting      Huber objective on log-loss, the grid-of-starts fit, fit diagnostics
  procedures   the study's fits: scratch, two-stage CPT, unfrozen, bootstrap wiring
  bootstrap    run-level bootstrap and percentile intervals
  allocation   N_opt / D_opt / optimal loss under C = 6 N D, the loss-compute frontier
  savings      compute saved and tokens transferred by CPT runs, along training
  comparison   Table 3 fit errors and leave-largest-sizes-out extrapolation
  forgetting   the law of forgetting for source-language loss under replay
  planner      recommended N, D for CPT and scratch at a budget
  tables       run-table CSV I/O and validation
  collect      run tables from training MODEL_DIRs
  synthetic    run tables drawn from known laws (tests, benchmark, docs)
  plots        figures
  report, cli  the command line (`python -m t5x_cpt.scaling`)
"""

from t5x_cpt.scaling.allocation import compute_for_loss, constants, fit_frontier, optimal
from t5x_cpt.scaling.fitting import Fit, fit_law
from t5x_cpt.scaling.laws import CHINCHILLA, CPT, FRONTIER, FRONTIER_E, PowerLaw
from t5x_cpt.scaling.procedures import fit_cpt_two_stage, fit_table
from t5x_cpt.scaling.tables import ScalingInputError, Table, read_table, write_table

__all__ = [
    "CHINCHILLA", "CPT", "FRONTIER", "FRONTIER_E", "Fit", "PowerLaw", "ScalingInputError", "Table",
    "compute_for_loss", "constants", "fit_cpt_two_stage", "fit_frontier", "fit_law", "fit_table",
    "optimal", "read_table", "write_table",
]
