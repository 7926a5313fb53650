"""What the grow steps of ``--output instances`` cost: phase 4 (relabel and grow) of one block.

The class map of a synthetic 3-D nuclei volume (:func:`unetflow.sample.make_sample`) made
into instance classes by the training target (:func:`unetflow.train.targets.instance_to_classes`),
then, per number of steps, :func:`unetflow.label.grow` over one block plus its halo of that
many voxels, timed in this process (best of ``--repeat``):

    python bench/grow_steps.py                      # block 128^3, steps 3 and 9
    python bench/grow_steps.py --block 64 --steps 3,9,12
    python bench/grow_steps.py --repeat 5 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sections import machine, replace_section  # noqa: E402

SECTION = "## Instances grow steps (CPU):"


def measure(block: int, steps: list[int], repeat: int) -> list[dict[str, float]]:
    """Best-of-*repeat* seconds of :func:`unetflow.label.grow` per number of steps, on one block."""
    from unetflow.label import INTERIOR, grow
    from unetflow.sample import make_sample
    from unetflow.train.targets import instance_to_classes

    edge = block + 2 * max(steps)
    _, truth = make_sample((edge,) * 3, seed=0)
    classes = instance_to_classes(truth)
    seeds, _ = ndimage.label(classes == INTERIOR)
    rows = []
    for n in steps:
        cut = (slice(max(steps) - n, edge - max(steps) + n),) * 3  # the block and a halo of n
        labels, foreground = seeds[cut].astype(np.uint64), classes[cut] != 0
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            grow(labels, foreground, n)
            times.append(time.perf_counter() - t0)
        rows.append({"steps": n, "voxels": int(labels.size), "seconds": round(min(times), 3), "runs": [round(t, 3) for t in times]})
    return rows


def table(rows: list[dict[str, float]], block: int) -> list[str]:
    lines = ["| grow steps | block + halo | seconds (best) | seconds per M voxels of the block |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['steps']} | {block + 2 * r['steps']}^3 | {r['seconds']:.3f} | {r['seconds'] / (block ** 3 / 1e6):.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--steps", default="3,9")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write", default=None, help="Rewrite this script's section of this Markdown file (BENCHMARKS.md).")
    args = ap.parse_args()
    rows = measure(args.block, [int(s) for s in args.steps.split(",")], args.repeat)
    print(json.dumps(rows, indent=1))
    print("\n".join(table(rows, args.block)))
    if args.write:
        replace_section(Path(args.write), SECTION, [
            f"{SECTION} {time.strftime('%Y-%m-%d')}", "",
            f"- machine: {machine(False)}, load average {os.getloadavg()[0]:.1f} after the run; numpy {np.__version__}",
            f"- command: `python bench/grow_steps.py {' '.join(sys.argv[1:])}`",
            f"- method: `bench/grow_steps.py` (its docstring): `unetflow.label.grow` on one {args.block}^3 block of synthetic nuclei "
            f"with the core target's classes, plus a halo of as many voxels as steps; one process, one thread, best of {args.repeat}",
            "", *table(rows, args.block), "",
            "- not measured: a whole relabel phase on a cluster (it also reads the scratch and writes the output), 2-D blocks",
        ])


if __name__ == "__main__":
    main()
