"""Demo slide generation: time and peak memory at two slide sizes (memory should not grow with the height).

Each size is made by `make_demo_slide` in its own fresh Python process, which reports its peak RSS
(`resource.getrusage`, so the interpreter and its imports are included) and its RSS after the imports;
the slide (a pyramidal tiled TIFF in a temporary directory) is deleted afterwards. Repeats give min and
median wall times; the peak RSS is the largest seen. The baseline is the whole-level generator this
replaces (histodistill before issue 19): 12,288 × 9,216 px took 4 min 10 s and peaked at 9.7 GiB (issue 19);
on 4,096 × 3,072 px it took 12 s and peaked at 0.83 GiB (measured on this 2-core machine under load).
The streaming generator, 2026-12-01, one run each on this 2-core machine beside a CI run (wall times not
meaningful; 32 CPU s for both): peak RSS 106 MiB at 4,096 × 3,072 and 229 MiB at 12,288 × 9,216 (40 MiB after
the imports): 2.87× above the imports for 3× the width and 9× the pixels, one band of tile rows.

Usage: python benchmarks/demo_slide.py [--sizes 4096x3072 12288x9216 --repeats 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, time
from pathlib import Path
from histodistill.demo.slides import DemoSlideConfig, make_demo_slide
width, height, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
make_demo_slide(out, 1, DemoSlideConfig(width, height))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_kb": peak, "imports_kb": before, "bytes": out.stat().st_size}))
"""


def run(width: int, height: int, repeats: int) -> dict:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "slide.tiff"
        for _ in range(repeats):
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(width), str(height), str(out)],
                check=True,
                capture_output=True,
                text=True,
            )
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            out.unlink()
    times = [r["seconds"] for r in results]
    return {
        "min_s": min(times),
        "median_s": statistics.median(times),
        "peak_mib": max(r["peak_kb"] for r in results) / 1024,
        "imports_mib": max(r["imports_kb"] for r in results) / 1024,
        "file_mib": results[-1]["bytes"] / 2**20,
        "level0_mib": width * height * 3 / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["4096x3072", "12288x9216"])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(
        f"{'size (px)':>12} {'min s':>8} {'median s':>9} {'peak RSS MiB':>13} {'after imports':>14} "
        f"{'level 0 RGB MiB':>16} {'file MiB':>9}"
    )
    rows = {}
    for size in args.sizes:
        width, height = (int(v) for v in size.lower().split("x"))
        r = rows[size] = run(width, height, args.repeats)
        print(
            f"{size:>12} {r['min_s']:8.1f} {r['median_s']:9.1f} {r['peak_mib']:13.0f} {r['imports_mib']:14.0f} "
            f"{r['level0_mib']:16.0f} {r['file_mib']:9.1f}"
        )
    if len(rows) > 1:
        first, last = rows[args.sizes[0]], rows[args.sizes[-1]]
        grow = (last["peak_mib"] - last["imports_mib"]) / max(first["peak_mib"] - first["imports_mib"], 1e-9)
        pixels = last["level0_mib"] / first["level0_mib"]
        print(
            f"peak RSS above imports grows {grow:.2f}x for {pixels:.0f}x the pixels ({args.sizes[-1]} vs "
            f"{args.sizes[0]}; it grows with the width, one band of rows, not the height). Baseline 12288x9216: "
            "250 s, 9.7 GiB (issue 19)."
        )


if __name__ == "__main__":
    main()
