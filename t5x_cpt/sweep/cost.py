"""What a sweep costs: training FLOPs by run kind and size, the TPU slice each size needs, hours.

FLOPs are `t5x_cpt.flops` (6N + attention per token) times the tokens each run trains
(TRAIN_STEPS x BATCH_SIZE x SEQUENCE_LENGTH), from the runs' own gin configs. The slice is the
smallest power-of-two number of chips on which `t5x_cpt.memory`'s estimate of one train step (the
run's dtype, remat and batch; parameters, optimizer state and batch fully sharded over one 'fsdp'
mesh axis, the default rules) fits in 90% of a chip's HBM, as the trainer's own memory check
requires; at least one host's chips. Hours = FLOPs / (chips x the chip's declared bf16 peak x MFU),
where the MFU is an ASSUMPTION passed by the caller, not a measurement.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from typing import Sequence

from t5x_cpt import flops
from t5x_cpt.sweep.configure import ConfiguredRun

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation: gcloud type prefix, JAX device kind (for the peak), HBM, chips per host."""

    name: str
    device_kind: str
    hbm_bytes: int
    chips_per_host: int
    cores_per_chip: int  # v4/v5p slice names count TensorCores, two per chip

    def slice_name(self, chips: int) -> str:
        return f"{self.name}-{chips * self.cores_per_chip}"

    @property
    def peak_flops(self) -> float:
        return flops.declared_peak_flops(self.device_kind)


# HBM per chip from Google Cloud's TPU system-architecture pages (v4: 32 GiB, v5p: 95 GiB, v5e: 16 GiB).
CHIPS = {
    "v4": Chip("v4", "TPU v4", 32 * GIB, 4, 2),
    "v5p": Chip("v5p", "TPU v5p", 95 * GIB, 4, 2),
    "v5e": Chip("v5litepod", "TPU v5 lite", 16 * GIB, 8, 1),
}
MEMORY_HEADROOM = 0.9
MAX_CHIPS = 8192


def min_chips(run: ConfiguredRun, chip: Chip) -> int | None:
    """Smallest power-of-two chip count whose memory fits one train step of `run` (None: none up to MAX_CHIPS)."""
    return _min_chips(run.model_config, run.batch_size, run.sequence_length, chip)


@functools.lru_cache(maxsize=None)
def _min_chips(config, batch_size: int, sequence_length: int, chip: Chip) -> int | None:
    from t5x_cpt import memory

    chips = chip.chips_per_host
    while chips <= min(MAX_CHIPS, batch_size):
        estimate = memory.estimate_train_memory(
            config, global_batch=batch_size, sequence_length=sequence_length,
            accumulate_steps=1, mesh_shape={"data": 1, "fsdp": chips, "tensor": 1}, platform="tpu")
        if estimate.total <= MEMORY_HEADROOM * chip.hbm_bytes:
            return chips
        chips *= 2
    return None


@dataclasses.dataclass
class SizeCost:
    size: str
    params: int
    runs: int = 0
    tokens: float = 0.0
    train_flops: float = 0.0
    chips: int = 0
    fits: bool = True


def by_size(runs: Sequence[ConfiguredRun], chip: Chip) -> list[SizeCost]:
    """Runs, tokens, FLOPs and the minimum slice per model size, smallest size first."""
    sizes: dict[str, SizeCost] = {}
    for run in runs:
        entry = sizes.setdefault(run.run.size.name, SizeCost(run.run.size.name, run.params))
        entry.runs += 1
        entry.tokens += run.tokens
        entry.train_flops += run.train_flops
        need = min_chips(run, chip)
        if need is None:
            entry.fits = False
        else:
            entry.chips = max(entry.chips, need)
    return sorted(sizes.values(), key=lambda s: s.params)


def by_kind(runs: Sequence[ConfiguredRun]) -> dict[str, tuple[int, float, float]]:
    """run kind -> (runs, tokens, FLOPs)."""
    out: dict[str, list] = defaultdict(lambda: [0, 0.0, 0.0])
    for run in runs:
        entry = out[run.run.run_kind]
        entry[0] += 1
        entry[1] += run.tokens
        entry[2] += run.train_flops
    return {k: tuple(v) for k, v in out.items()}


def hours(train_flops: float, chips: int, chip: Chip, mfu: float) -> float:
    return train_flops / (chips * chip.peak_flops * mfu) / 3600.0


def totals(runs: Sequence[ConfiguredRun]) -> str:
    """Markdown: runs, tokens and training FLOPs by run kind, and in all."""
    lines = ["| run kind | runs | tokens | training FLOPs |", "| --- | ---: | ---: | ---: |"]
    for kind, (count, tokens, kind_flops) in sorted(by_kind(runs).items()):
        lines.append(f"| {kind} | {count} | {tokens:.3g} | {kind_flops:.3g} |")
    lines.append(f"| all | {len(runs)} | {sum(r.tokens for r in runs):.3g} | {sum(r.train_flops for r in runs):.3g} |")
    return "\n".join(lines)


def summary(runs: Sequence[ConfiguredRun], chip: Chip, mfu: float) -> str:
    """Markdown: totals by run kind, then per size the slice and the hours at the assumed MFU."""
    total = sum(r.train_flops for r in runs)
    lines = [totals(runs), "",
              f"Per size on {chip.name} (HBM {chip.hbm_bytes / GIB:.0f} GiB, peak {chip.peak_flops / 1e12:.0f} TFLOP/s "
              f"bf16) at an ASSUMED MFU of {100 * mfu:.0f}%: the smallest slice whose memory fits a train step, and "
              "the hours its runs take one after another on it.", "",
              "| size | N | runs | FLOPs | slice (chips) | hours on it | chip-hours |",
              "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    chip_hours = 0.0
    for entry in by_size(runs, chip):
        chip_hours += entry.train_flops / (chip.peak_flops * mfu) / 3600.0
        if not entry.fits:
            lines.append(f"| {entry.size} | {entry.params / 1e6:,.0f}M | {entry.runs} | {entry.train_flops:.3g} | "
                         f"does not fit (raise train.accumulate_steps) | | |")
            continue
        lines.append(f"| {entry.size} | {entry.params / 1e6:,.0f}M | {entry.runs} | {entry.train_flops:.3g} | "
                     f"{chip.slice_name(entry.chips)} ({entry.chips}) | {hours(entry.train_flops, entry.chips, chip, mfu):,.1f} | "
                     f"{entry.train_flops / (chip.peak_flops * mfu) / 3600.0:,.0f} |")
    lines += ["", f"Total: {total:.3g} training FLOPs = {chip_hours:,.0f} {chip.name} chip-hours at {100 * mfu:.0f}% MFU "
              "(evaluation not included)."]
    return "\n".join(lines)


def configure_sweeps(sweep_files: Sequence[str], output_dir: str | None = None) -> list[ConfiguredRun]:
    """Every run of several sweep files, a run shared between them (same MODEL_DIR) counted once."""
    import gin

    from t5x_cpt.sweep import configure, plan, spec

    configure.register_configurables()
    runs: dict[str, ConfiguredRun] = {}
    for path in sweep_files:
        sweep = spec.read_sweep([path], (), output_dir)
        for planned in plan.expand(sweep):
            if planned.model_dir not in runs:
                runs[planned.model_dir] = configure.configure(planned, sweep)
    gin.clear_config()
    return list(runs.values())


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m t5x_cpt.sweep.cost SWEEP.gin [SWEEP.gin ...] [--chip=v5p] [--assumed_mfu=0.4]`:
    the summary of several sweeps together (shared runs once), e.g. the whole paper study."""
    import argparse

    from t5x_cpt.errors import run_command
    from t5x_cpt.sweep.spec import SweepError

    def body(args_in):
        p = argparse.ArgumentParser(prog="python -m t5x_cpt.sweep.cost", description=main.__doc__)
        p.add_argument("sweep_files", nargs="+")
        p.add_argument("--chip", default="v5p", choices=sorted(CHIPS))
        p.add_argument("--assumed_mfu", type=float, default=0.4)
        args = p.parse_args(args_in)
        if not 0 < args.assumed_mfu <= 1:
            raise SweepError(f"--assumed_mfu={args.assumed_mfu}: must be in (0, 1]")
        runs = configure_sweeps(args.sweep_files)
        print(f"{len(runs)} distinct runs in {', '.join(args.sweep_files)}\n")
        print(summary(runs, CHIPS[args.chip], args.assumed_mfu))
        return 0

    return run_command("t5x_cpt.sweep.cost", body, argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
