"""OpenMP's wait policy for the command line: threads that sleep when they run out of work, not spin, when the
machine's cores are already shared.

torch's CPU kernels run on GNU OpenMP threads, which by default spin for a while at the end of every parallel
region before sleeping. On a machine whose cores are shared with another busy process, a spinning thread takes
a core the other thread of the same region needs, and the region waits for the scheduler. Measured on 2 cores
with SmolLM2-135M in float32 (decoding 8 sequences; a forward and backward of 8 x 64 tokens), 2 threads:

    per decode step     idle 119 ms   (PASSIVE 144 ms)   beside a busy process 416-2,227 ms (PASSIVE 198-211 ms)
    forward + backward  idle 2.73 s   (PASSIVE 2.99 s)   beside a busy process 7.4-8.6 s    (PASSIVE 5.2 s)

Spinning saves 9-20% there on idle cores and costs 1.4x to 10x on shared ones; on the tiny demo (many small
operations, where a sleeping thread's wake-up is a large share of each) sleeping costs more: the default job took
223 s with PASSIVE against 141 s spinning on 2 idle cores. So the command line decides from the machine at start:
when other processes already keep at least ``BUSY_CORES`` cores' worth of CPU busy (measured over 0.2 s from
/proc/stat) it asks for ``OMP_WAIT_POLICY=PASSIVE``, and otherwise leaves OpenMP's default. A user's own choice
(``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set) always stands. OpenMP reads the variable once, when torch loads
it, so this runs before anything imports torch; this module imports nothing that does.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import MutableMapping

CLI_SCRIPT = "lightning-gspo-train"
# Other processes' CPU use, in cores, from which idle OpenMP threads had better sleep: one busy process on a
# 2-core machine is ~1.0; a quiet machine's background stays well under 0.5.
BUSY_CORES = 0.5


def busy_cores(seconds: float = 0.2) -> float | None:
    """Cores' worth of CPU time the machine spent busy over ``seconds`` (this process sleeps meanwhile, so it is
    the other processes'); None where /proc/stat cannot be read."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # all, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def prefer_passive_wait(environ: MutableMapping[str, str] = os.environ, busy: float | None = None) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` when the user set no wait policy, torch is not loaded yet
    (it would be too late for this process) and other processes keep at least ``BUSY_CORES`` busy (``busy``, or
    measured now); whether it was set."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ or "torch" in sys.modules:
        return False
    busy = busy_cores() if busy is None else busy
    if busy is None or busy < BUSY_CORES:
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def is_cli_entry(module_name: str) -> bool:
    """Whether the training module runs as the program (``python -m``, or the console script), not as a library
    someone imported: only the program's own process and its children (DDP workers) get the policy."""
    return module_name == "__main__" or os.path.basename(sys.argv[0] if sys.argv else "") == CLI_SCRIPT
