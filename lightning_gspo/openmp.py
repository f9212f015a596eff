"""OpenMP's wait policy for the command line: threads that sleep when they run out of work, not spin.

torch's CPU kernels run on GNU OpenMP threads, which by default spin for a while at the end of every parallel
region before sleeping. On a machine whose cores are shared with another busy process, a spinning thread takes
a core the other thread of the same region needs, and the region waits for the scheduler. Measured on 2 cores
with SmolLM2-135M in float32 (decoding 8 sequences; a forward and backward of 8 x 64 tokens), 2 threads:

    per decode step     idle 119 ms   (PASSIVE 144 ms)   beside a busy process 416-2,227 ms (PASSIVE 198-211 ms)
    forward + backward  idle 2.73 s   (PASSIVE 2.99 s)   beside a busy process 7.4-8.6 s    (PASSIVE 5.2 s)

Spinning saves 9-20% on idle cores and costs 1.4x to 10x on shared ones, so the command line asks for
``OMP_WAIT_POLICY=PASSIVE`` unless the user has chosen (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set; export
``OMP_WAIT_POLICY=ACTIVE`` on dedicated cores). OpenMP reads the variable once, when torch loads it, so this
must run before anything imports torch; this module imports nothing that does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

CLI_SCRIPT = "lightning-gspo-train"


def prefer_passive_wait(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` when the user set no wait policy and torch is not loaded yet
    (it would be too late for this process); whether it was set."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ or "torch" in sys.modules:
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def is_cli_entry(module_name: str) -> bool:
    """Whether the training module runs as the program (``python -m``, or the console script), not as a library
    someone imported: only the program's own process and its children (DDP workers) get the policy."""
    return module_name == "__main__" or os.path.basename(sys.argv[0] if sys.argv else "") == CLI_SCRIPT
