"""Two builds of effops on the issue #15 shapes, alternated: `benchmarks.int8_rows --vs-fbgemm --peak auto`
run in separate processes, one tree then the other, --runs times each, with the ranges of each tree's
figures printed at the end (per shape: 8-bit Int8Linear vs FBGEMM, the medians' [min-max] over the runs,
and % of the one-thread vpdpbusd peak). Two builds cannot share a process (both register the effops
ops), and on a shared machine the load moves between runs, so alternating is what keeps the comparison
fair; compare the ranges, not single runs.

Usage (a copy of another build's tree, e.g. main's, with its compiled extension):
    cp -r /path/to/main/effops /path/to/main/benchmarks /tmp/int8base/
    python -m benchmarks.int8_ab /tmp/int8base [--runs 3]
"""
import argparse
import collections
import os
import re
import subprocess
import sys

LINE = re.compile(r"^(M=\s*\d+\s+\d+ x \d+)\s.*8-bit\s+[\d.]+ us ([\d.]+)x .*8-bit (\d+)% of peak")


def run(tree):
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run([sys.executable, "-m", "benchmarks.int8_rows", "--vs-fbgemm", "--peak", "auto"], cwd=tree,
                         env=env, capture_output=True, text=True, check=True).stdout
    print(out, flush=True)
    return [(m.group(1), float(m.group(2)), int(m.group(3))) for m in map(LINE.match, out.splitlines()) if m]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("base", help="the other tree (holding effops/ with its build, and benchmarks/)")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"base": os.path.abspath(args.base), "this": here}
    got = {name: collections.defaultdict(list) for name in trees}
    for i in range(args.runs):
        for name, tree in trees.items():
            print("=== %s (%s), run %d" % (name, tree, i + 1), flush=True)
            for case, ratio, pct in run(tree):
                got[name][case].append((ratio, pct))
    print("8-bit Int8Linear vs FBGEMM [min-max of the runs' medians], % of peak [min-max]")
    for case in got["this"]:
        cells = []
        for name in trees:
            r = got[name][case]
            cells.append("%s %.2f-%.2fx (%d-%d%%)" % (name, min(x for x, _ in r), max(x for x, _ in r),
                                                     min(y for _, y in r), max(y for _, y in r)))
        print("%-20s %s" % (case, "   ".join(cells)))


if __name__ == "__main__":
    main()
