"""Several processes, one run: JAX's multi-controller runtime and the few collectives hosts need.

Every process of a run executes the same program. This module

  * initialises `jax.distributed` once per process, from t5x's flags (`--coordinator_address`,
    `--process_count`, `--process_index`) or, without them, from what JAX detects (Cloud TPU VM
    slices, SLURM, ...); with neither, the run is a single process;
  * lets hosts decide together: `broadcast_json` (process 0 decides, everyone gets its answer),
    `allgather_json` and `all_agree` (everyone reports, everyone sees all reports);
  * turns a preemption notice into a step at which every host saves (`PreemptionWatch`);
  * ends a process at once on an error (`exit_now`), so that its peers learn of it through the
    coordination service's heartbeats within seconds instead of a 300 s shutdown barrier.

Pre-flight check for launch scripts:

    python -m t5x_cpt.distributed --expect_process_count=N [--coordinator_address=H:P ...]

prints `process i/n: ...` on every process and exits 2 when the count is not N.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
from typing import Any, Sequence

from t5x_cpt.errors import USAGE_EXIT_CODE, UserInputError, run_command

log = logging.getLogger(__name__)

# A lost peer is reported by the coordination service after this many seconds without a
# heartbeat; JAX's default (100 s) would leave the survivors waiting well over a minute.
DEFAULT_HEARTBEAT_TIMEOUT_S = 30
DEFAULT_INITIALIZATION_TIMEOUT_S = 300


class DistributedError(UserInputError):
    """The processes of a run cannot be brought together (flags, counts, addresses)."""


@dataclasses.dataclass(frozen=True)
class DistributedFlags:
    """t5x's multi-process flags; all None means 'detect, else single process'."""

    coordinator_address: str | None = None
    process_count: int | None = None
    process_index: int | None = None
    initialization_timeout: int = DEFAULT_INITIALIZATION_TIMEOUT_S
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT_S

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in (self.coordinator_address, self.process_count, self.process_index))


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Adds the distributed flags (same names as t5x) to an argparse parser."""
    group = parser.add_argument_group("multi-process (omit all on one machine, a TPU VM slice or SLURM)")
    group.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                       help="address of process 0's coordination service")
    group.add_argument("--process_count", type=int, default=None, metavar="N", help="number of processes")
    group.add_argument("--process_index", type=int, default=None, metavar="I", help="this process, 0..N-1")
    group.add_argument("--initialization_timeout", type=int, default=DEFAULT_INITIALIZATION_TIMEOUT_S,
                       metavar="SECONDS", help="how long to wait for every process to connect "
                       f"(default {DEFAULT_INITIALIZATION_TIMEOUT_S})")
    group.add_argument("--heartbeat_timeout", type=int, default=DEFAULT_HEARTBEAT_TIMEOUT_S, metavar="SECONDS",
                       help="a process silent this long is declared lost and every process stops "
                       f"(default {DEFAULT_HEARTBEAT_TIMEOUT_S})")


def flags_from_args(args: argparse.Namespace) -> DistributedFlags:
    return DistributedFlags(args.coordinator_address, args.process_count, args.process_index,
                            args.initialization_timeout, args.heartbeat_timeout)


def _validate(flags: DistributedFlags) -> None:
    given = {"--coordinator_address": flags.coordinator_address, "--process_count": flags.process_count,
             "--process_index": flags.process_index}
    missing = [name for name, value in given.items() if value is None]
    if missing and len(missing) < 3:
        raise DistributedError(f"{', '.join(missing)} missing: give all three multi-process flags or none")
    if flags.process_count is not None and flags.process_count < 1:
        raise DistributedError(f"--process_count must be >= 1, got {flags.process_count}")
    if flags.process_index is not None and not 0 <= flags.process_index < (flags.process_count or 0):
        raise DistributedError(f"--process_index={flags.process_index} is not in 0..{flags.process_count - 1} "
                               f"(--process_count={flags.process_count})")
    address = flags.coordinator_address
    if address is not None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise DistributedError(f"--coordinator_address={address!r} is not HOST:PORT")
    for name in ("initialization_timeout", "heartbeat_timeout"):
        if getattr(flags, name) < 1:
            raise DistributedError(f"--{name} must be at least 1 second, got {getattr(flags, name)}")


def _detected_cluster() -> str | None:
    """The cluster JAX would auto-initialise from (TPU VM slice, SLURM, ...), or None."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    from jax._src import clusters  # JAX's own detection; there is no public API for "is there one?"

    for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
        try:
            if not env.opt_in_only_method and env.is_env_present():
                return env.__name__
        except Exception:  # a detector probing a metadata server that is not there  # noqa: BLE001
            continue
    return None


_initialized = False
_heartbeat_timeout = DEFAULT_HEARTBEAT_TIMEOUT_S


def initialize(flags: DistributedFlags = DistributedFlags()) -> None:
    """Joins this process to its run (once per process; later calls do nothing).

    On CPU the collectives go through gloo, so a multi-process run works on plain machines too.
    """
    global _initialized, _heartbeat_timeout
    if _initialized:
        return
    _validate(flags)
    import jax

    cluster = None if flags.explicit else _detected_cluster()
    if not flags.explicit and cluster is None:
        _initialized = True
        return
    if flags.explicit and flags.process_count == 1:
        _initialized = True
        return
    _heartbeat_timeout = flags.heartbeat_timeout
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = flags.coordinator_address or cluster
    log.info("joining the run: %s", f"process {flags.process_index}/{flags.process_count} via {where}"
             if flags.explicit else f"detected {cluster}")
    # JAX's client aborts the process (SIGABRT, a C++ stack) when the others do not arrive in time;
    # a watchdog says why first, in one line, and exits with the usage code instead.
    watchdog = threading.Timer(max(flags.initialization_timeout - 0.5, 0.5), _give_up, args=(
        f"could not join the run through the coordinator at {where} within {flags.initialization_timeout} s"
        + (f" (this is process {flags.process_index} of {flags.process_count})" if flags.explicit else "")
        + ". Check that every process was started with the same --coordinator_address and --process_count, that "
        "process 0 is running, and that the port is reachable",))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=flags.coordinator_address, num_processes=flags.process_count,
            process_id=flags.process_index, initialization_timeout=flags.initialization_timeout,
            heartbeat_timeout_seconds=flags.heartbeat_timeout)
    except Exception as e:  # the runtime raises a bare XlaRuntimeError/ValueError with gRPC text
        raise DistributedError(
            f"could not join the run through the coordinator at {where} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]}). Check that every process was started with the same "
            "--coordinator_address and --process_count, that process 0 is running, and that the port is "
            "reachable") from e
    finally:
        watchdog.cancel()
    _initialized = True


def _give_up(message: str) -> None:
    print(f"t5x_cpt: error: {message}", file=sys.stderr, flush=True)
    os._exit(USAGE_EXIT_CODE)  # pylint: disable=protected-access


def process_summary() -> str:
    """`process i/n: local devices L, global devices G, kind K` for this process."""
    import jax

    return (f"process {jax.process_index()}/{jax.process_count()}: local devices {jax.local_device_count()}, "
            f"global devices {jax.device_count()}, kind {jax.devices()[0].device_kind}")


def is_primary() -> bool:
    import jax

    return jax.process_index() == 0


# ----------------------------------------------------------------------------------------------
# Deciding together


def allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON-able `obj`, in process order (a collective: call it on every process)."""
    import jax

    if jax.process_count() == 1:
        return [json.loads(json.dumps(obj))]
    import numpy as np
    from jax.experimental import multihost_utils

    payload = np.frombuffer(json.dumps(obj).encode("utf-8"), dtype=np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([payload.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:payload.size] = payload
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(bytes(gathered[i, :lengths[i]]).decode("utf-8")) for i in range(len(lengths))]


def broadcast_json(obj: Any) -> Any:
    """Process 0's `obj` on every process: a decision taken once and shared (collective)."""
    return allgather_json(obj if is_primary() else None)[0]


def all_agree(flag: bool) -> bool:
    """True on every process when `flag` is true on every process (collective)."""
    return all(allgather_json(bool(flag)))


def sync(name: str) -> None:
    """A barrier across processes (no-op for one)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------------
# Preemption and failure


class PreemptionWatch:
    """Says, at a step every process agrees on, that the run must save and stop.

    One process: SIGTERM sets a flag. Several: JAX's preemption service (it handles SIGTERM on
    every host and agrees on a step), so all hosts save the same step — a per-host flag would
    have each host save a different one.
    """

    def __init__(self):
        import jax

        self._multi = jax.process_count() > 1
        self._requested = False
        if not self._multi and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        log.warning("SIGTERM received: saving a checkpoint at the end of this step, then exiting")
        self._requested = True

    def reached(self, step: int) -> bool:
        """Call once per step on every process; True at the step to save and stop at."""
        if not self._multi:
            return self._requested
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            self._requested = True
            log.warning("preemption notice: every process saves step %d and stops", step)
        return self._requested


def has_peers() -> bool:
    """True when this process joined a run of several processes."""
    import jax

    return _initialized and jax.process_count() > 1


# What a collective reports when the process at the other end is gone (gloo, gRPC).
_PEER_FAILURE = re.compile(r"gloo|connection reset|connection refused|broken pipe|unavailable|deadline exceeded|"
                           r"socket closed|heartbeat", re.IGNORECASE)


def lost_peers(error: BaseException) -> list[int] | None:
    """The processes that stopped responding, when `error` looks like a failed collective.

    Asks the coordination service which processes are alive; it answers once the dead ones have
    missed their heartbeats (at most the heartbeat timeout). None when the error is this
    process's own, or when no answer comes in time.
    """
    if not has_peers() or not _PEER_FAILURE.search(f"{type(error).__name__} {error}"):
        return None
    import jax
    from jax._src import distributed as jax_distributed  # the client has no public accessor

    everyone = list(range(jax.process_count()))
    answer: list = []
    probe = threading.Thread(target=lambda: answer.append(jax_distributed.global_state.client.get_live_nodes(everyone)),
                             daemon=True)
    probe.start()
    probe.join(_heartbeat_timeout + 10)
    if not answer:
        return None
    return [i for i in everyone if i not in answer[0]]


def exit_now(code: int) -> None:
    """Ends this process at once, skipping the distributed shutdown barrier.

    With several processes a normal exit waits (up to 300 s) for every peer at a barrier that
    a failed run never reaches; exiting at once lets the peers' coordination service notice
    within the heartbeat timeout and stop them, naming this process.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------------------------
# Pre-flight command


def _check(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m t5x_cpt.distributed",
                                     description="Join the run's processes, print one line per process, "
                                     "and check the process count (a launch pre-flight).")
    parser.add_argument("--expect_process_count", type=int, default=None, metavar="N",
                        help="exit 2 unless the run has exactly N processes")
    add_flags(parser)
    args = parser.parse_args(argv)
    initialize(flags_from_args(args))
    import jax

    print(process_summary(), flush=True)
    if args.expect_process_count is not None and jax.process_count() != args.expect_process_count:
        raise DistributedError(f"this run has {jax.process_count()} processes but {args.expect_process_count} "
                               "were expected (is the slice type right, and was the command started on every "
                               "worker, --worker=all?)")
    sync("t5x_cpt.distributed.check")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run_command("t5x_cpt.distributed", _check, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
