"""Per test file: wall seconds, XLA compiles (and their seconds), persistent-cache hits and
misses, summed over pytest-xdist's workers, from a run with NTI_SUITE_STATS=DIR (tests/conftest.py).

    NTI_SUITE_STATS=/tmp/stats make test && python scripts/suite_stats.py /tmp/stats
"""

from __future__ import annotations

import glob
import json
import os
import sys


def table(folder: str) -> str:
    files: dict = {}
    for path in glob.glob(os.path.join(folder, "*.json")):
        with open(path) as f:
            for name, row in json.load(f).items():
                into = files.setdefault(name, dict.fromkeys(row, 0))
                for k, v in row.items():
                    into[k] += v
    lines = ["| file | wall s | compiles | compile s | cache hits | cache misses |", "|---|---|---|---|---|---|"]
    for name, r in sorted(files.items(), key=lambda kv: -kv[1]["wall_s"]):
        lines.append(f"| {name} | {r['wall_s']:.0f} | {r['compiles']} | {r['compile_s']:.0f} | {r['cache_hits']} | {r['cache_misses']} |")
    total = {k: sum(r[k] for r in files.values()) for k in ("wall_s", "compiles", "compile_s", "cache_hits", "cache_misses")}
    lines.append(f"| all | {total['wall_s']:.0f} | {total['compiles']} | {total['compile_s']:.0f} | {total['cache_hits']} | {total['cache_misses']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        sys.exit("usage: python scripts/suite_stats.py DIR (a run's NTI_SUITE_STATS folder)")
    print(table(sys.argv[1]))
