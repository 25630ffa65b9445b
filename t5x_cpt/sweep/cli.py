"""`python -m t5x_cpt.sweep --gin_file=configs/sweeps/NAME.gin [flags] [--gin.NAME=VALUE ...]`.

    (no flag)          train every unfinished run here, one after another, then analyse
    --dry_run          build and check every run's config, print the runs and their FLOPs; train nothing
                       (with --chip=v5p|v4|v5e: the TPU slice per size and hours at --assumed_mfu)
    --print_commands   print one shell-quoted `python -m t5x_cpt.train ...` command per run (for a cluster)
    --analyse_only     write the run table, fits, plots and report.md from what the runs have logged so far
    --only=REGEX       only the runs whose name matches (plus the sources their CPT runs need)
    --output_dir=DIR   where the runs go (local or gs://); default: Sweep.output_dir, else runs/sweeps/NAME

Exit codes: 0 done; 2 bad input (one line on stderr, nothing trained or overwritten); 143 a run was
preempted after saving a checkpoint, or the sweep got SIGTERM (re-run the same command to continue);
1 a bug (traceback). docs/study.md explains sweep files, resuming and cluster use.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from typing import Sequence

from t5x_cpt import gin_cli
from t5x_cpt.errors import run_command
from t5x_cpt.sweep import plan as plan_lib
from t5x_cpt.sweep.spec import SweepError, read_sweep

PROG = "python -m t5x_cpt.sweep"
log = logging.getLogger("t5x_cpt.sweep")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1] if "\n\n" in __doc__ else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="docs/study.md")
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--dry_run", action="store_true", help="check every run's config; print runs and FLOPs")
    modes.add_argument("--print_commands", action="store_true", help="print one launch command per run")
    modes.add_argument("--analyse_only", action="store_true", help="only write the tables, fits, plots and report")
    p.add_argument("--only", help="regular expression on run names (the CPT runs' sources are added)")
    p.add_argument("--output_dir", help="directory of the runs (local or gs://...)")
    p.add_argument("--analysis_dir", help="where the tables, fits, plots and report.md go (default OUTPUT_DIR/analysis/NAME)")
    p.add_argument("--chip", help="with --dry_run: also size a TPU slice per model size and its hours (v4, v5p or v5e)")
    p.add_argument("--assumed_mfu", type=float, default=0.4,
                   help="model FLOPs utilisation ASSUMED for --chip's hours (default 0.4)")
    p.add_argument("--gin_file", action="append", metavar="FILE", help="sweep gin file (repeatable)")
    p.add_argument("--gin.NAME=VALUE", dest="_gin_help", metavar="", action="append",
                   help="override a sweep binding, e.g. --gin.Sweep.bootstrap=200")
    return p


def _configure_logging() -> None:
    # Not forced: a host that already configured logging (pytest, a notebook) keeps its handlers.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("t5x_cpt").setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "tensorflow", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _regenerate_command(files: Sequence[str], bindings: Sequence[str], output_dir: str, analysis_dir: str | None) -> str:
    argv = ["python", "-m", "t5x_cpt.sweep", *(f"--gin_file={f}" for f in files), *(f"--gin.{b}" for b in bindings),
            f"--output_dir={output_dir}", *([f"--analysis_dir={analysis_dir}"] if analysis_dir else []), "--analyse_only"]
    return shlex.join(argv)


def _print_commands(configured, out=None) -> None:
    out = out or sys.stdout
    sources = [c for c in configured if c.run.run_kind == "source"]
    others = [c for c in configured if c.run.run_kind != "source"]
    if sources:
        print("# stage 1: source runs. The CPT runs below start from them: launch those once these have finished.",
              file=out)
        for c in sources:
            print(plan_lib.shell_command(c.argv()), file=out)
    print(f"# stage {2 if sources else 1}: scratch and CPT runs (independent of each other). Re-running a command "
          "resumes its run (a finished run only loads and exits).", file=out)
    for c in others:
        print(plan_lib.shell_command(c.argv()), file=out)


def _print_dry_run(configured, chip_name: str, mfu: float, out=None) -> None:
    out = out or sys.stdout
    from t5x_cpt.sweep import cost

    if chip_name is not None and chip_name not in cost.CHIPS:
        raise SweepError(f"--chip={chip_name!r}: choose from {sorted(cost.CHIPS)}")
    if not 0 < mfu <= 1:
        raise SweepError(f"--assumed_mfu={mfu}: must be in (0, 1]")
    print("| run | kind | N | ladder N | steps | batch x length | tokens | FLOPs |", file=out)
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |", file=out)
    for c in configured:
        listed = f"{c.listed_params:,}" if c.listed_params is not None else ""
        print(f"| {c.name} | {c.run.run_kind} | {c.params:,} | {listed} | {c.train_steps:,} | "
              f"{c.batch_size} x {c.sequence_length} | {c.tokens:,} | {c.train_flops:.4g} |", file=out)
    print("", file=out)
    if chip_name is None:
        print(cost.totals(configured), file=out)
        print("\n(--chip=v5p|v4|v5e adds the TPU slice each size needs and its hours at --assumed_mfu)", file=out)
    else:
        print(cost.summary(configured, cost.CHIPS[chip_name], mfu), file=out)
    checked = sum(1 for c in configured if c.listed_params is not None)
    print(f"\n{len(configured)} run configs built and checked"
          + (f"; {checked} ladder runs within 1% of the ladder's listed N" if checked else "") + ".", file=out)


def run(argv: Sequence[str] | None) -> int:
    """The command (module docstring); bad input raises a UserInputError (exit 2)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    files, bindings, rest = gin_cli.split_gin_args(argv)
    args = parser().parse_args(rest)
    _configure_logging()
    spec = read_sweep(files, bindings, args.output_dir)

    from t5x_cpt.sweep import configure as configure_lib
    from t5x_cpt.sweep import execute

    configure_lib.register_configurables()
    planned = plan_lib.expand(spec)
    started = time.time()
    # Every run is configured (a bad one stops the sweep even outside --only); --only picks what runs.
    every = [configure_lib.configure(run, spec) for run in planned]
    chosen = {run.name for run in plan_lib.select(planned, args.only)}
    selected = [c for c in every if c.name in chosen]
    names = {run.name for run in planned}
    for c in selected:
        execute.check_source(c, names)
    log.info("sweep %s: %d run(s) planned, %d selected, configs built in %.1fs", spec.name, len(planned),
             len(selected), time.time() - started)
    if args.print_commands:
        _print_commands(selected)
        return 0
    for c in every:  # the analysis reads them all: none may hold another configuration
        execute.check_directory(c)
    if args.dry_run:
        _print_dry_run(selected, args.chip, args.assumed_mfu)
        return 0
    if not args.analyse_only:
        code = execute.execute(selected, [execute.run_state(c) for c in selected])
        if code != 0:
            return code
    from t5x_cpt.sweep import analyse

    analysis_dir = os.path.abspath(args.analysis_dir) if args.analysis_dir else analyse.default_analysis_dir(spec)
    command = _regenerate_command(files, bindings, spec.output_dir, args.analysis_dir)
    report, clean = analyse.analyse(spec, every, analysis_dir, command)
    print(f"report: {report}")
    if not clean:
        log.error("an analysis failed with a bug (traceback above; report.md names it)")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """0 when done; 2 with one line on stderr for bad input; 143 preempted (module docstring)."""
    return run_command("t5x_cpt.sweep", run, argv)
