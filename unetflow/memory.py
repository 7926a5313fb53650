"""A process's peak memory, measured one way everywhere (block results, done markers, benchmarks)."""

from __future__ import annotations

import resource


def peak_rss() -> int:
    """This process's peak resident set in bytes.

    Linux ``VmHWM`` (reset by exec); ``ru_maxrss`` would be inherited from the
    process that spawned the worker (the driver) and overstate a worker's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
