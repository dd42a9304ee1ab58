"""Segmenting a folder of real-sized CTs: does reading and writing hide behind the network?

Question: `medct segment -i FOLDER` reads and prepares the next case (resampled onto the network
grid, body mask) and finishes and writes the previous one (labels back on its own grid) on two
threads while the network runs on the current one (a bounded read-ahead / write-behind of one case
each). How close does that bring the folder's wall time to the time the network itself needs?

Input: 8 real-sized cases from ../shared/data/pancreas_ct_cbct (links with distinct names): the
planning CT (512 x 512 x 134, 1.07 x 1.07 x 3 mm, LPS) four times and the CBCT on its grid four
times (its circular field of view leaves fewer body tiles, so network times differ per case).
Model: bench/segment.py's (nnU-Net's PlainConvUNet 8-128 at 3 mm, 80^3 patches, trained on
phantoms, cached).

Arms, each a fresh process running `medct.segment_job.segment_paths` (imports included in the wall
time), interleaved A B C A B C ...:
  pipelined:      the default (reader and writer threads), bf16 autocast (`precision="bf16"`, what
                  auto chooses on this CPU, without auto's first-case fp32 check);
  pipelined_fp32: the same in fp32 (medct before the bf16 issue);
  sequential:     `pipeline=False`, read -> prepare -> network -> finish -> write, one after
                  another, bf16.
Network time is the sum of the network's forward passes (`Predictor.forward_seconds`, the
`network_seconds` column of summary.csv); "run" is the main thread's `Predictor.run` (forward
passes + blending the tiles).

Goal (bf16 issue 31; the core-seams issue asked 1.15): pipelined bf16 folder wall time <= 1.10 x the
sum of network time. bf16 halves the network's time, so the same reading and writing weigh twice as
much; fp32 is reported beside it.

Usage: python bench/segment_folder.py [--quick] [--model DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DATA, ROOT, paired_goal, write_result

RESULT = ROOT / "bench" / "results" / "segment_folder.json"
TARGET_RATIO = 1.10

_ARM = """
import json, sys, time
t0 = time.perf_counter()
from medct.segment_job import segment_paths
report = segment_paths(sys.argv[1], sys.argv[2], sys.argv[3], device="cpu", overwrite=True, pipeline=sys.argv[4] == "1",
                       precision=sys.argv[5])
print(json.dumps({"wall_s": time.perf_counter() - t0, "network_s": report.network_seconds,
                  "run_s": report.run_seconds, "done": len(report.done), "failed": len(report.failed)}))
"""


ARMS = {"pipelined": (True, "bf16"), "pipelined_fp32": (True, "fp32"), "sequential": (False, "bf16")}


def run_arm(model: Path, folder: Path, out: Path, pipeline: bool, precision: str) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _ARM, str(model), str(folder), str(out), "1" if pipeline else "0", precision],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start  # with interpreter start-up
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 cases, one run per arm")
    parser.add_argument("--model", default=None, help="exported model folder (default: bench/segment.py's model)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per arm (default: quick 1, full 2)")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 2)
    n_each = 2 if args.quick else 4
    pct = DATA / "pancreas_ct_cbct"
    sources = {"planct": pct / "planct.nii.gz", "cbct": pct / "cbct_CB07_on_planct_grid.nii.gz"}
    if not all(p.is_file() for p in sources.values()):
        print(f"real scans not found under {pct}", file=sys.stderr)
        return 1

    sys.path.insert(0, str(ROOT / "bench"))
    import segment  # bench/segment.py: its cached phantom-trained model

    model, model_info = segment.get_model(
        argparse.Namespace(model=args.model, train_steps=segment.RECIPE.steps, train_cases=segment.RECIPE.cases)
    )
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="medct_bench_folder_") as tmp:
        folder = Path(tmp) / "cases"
        folder.mkdir()
        for i in range(n_each):
            for name, src in sources.items():
                os.symlink(src, folder / f"{name}_{i}.nii.gz")
        for r in range(repeats):
            for arm, (pipeline, precision) in ARMS.items():
                res = run_arm(model, folder, Path(tmp) / f"out_{arm}", pipeline, precision)
                res.update(arm=arm, precision=precision, repeat=r)
                rows.append(res)
                print(
                    f"{res['arm']:<14} run {r}: wall {res['wall_s']:6.1f} s, network {res['network_s']:6.1f} s, "
                    f"run {res['run_s']:6.1f} s, wall/network {res['wall_s'] / res['network_s']:.3f}",
                    flush=True,
                )
    summary = {}
    for arm in ARMS:
        sel = [r for r in rows if r["arm"] == arm]
        ratio = [float(r["wall_s"]) / float(r["network_s"]) for r in sel]
        summary[arm] = {
            "wall_s_median": round(statistics.median(float(r["wall_s"]) for r in sel), 2),
            "network_s_median": round(statistics.median(float(r["network_s"]) for r in sel), 2),
            "run_s_median": round(statistics.median(float(r["run_s"]) for r in sel), 2),
            "wall_over_network_median": round(statistics.median(ratio), 3),
            "wall_over_network_range": [round(min(ratio), 3), round(max(ratio), 3)],
        }
    print(f"\n{'arm':<14} {'wall s':>8} {'network s':>10} {'run s':>10} {'wall/network':>13}")
    for arm, s in summary.items():
        print(
            f"{arm:<14} {s['wall_s_median']:>8.1f} {s['network_s_median']:>10.1f} {s['run_s_median']:>10.1f} "
            f"{s['wall_over_network_median']:>13.3f}"
        )
    measured = summary["pipelined"]["wall_over_network_median"]
    write_result(
        args.out,
        "segment_folder",
        {
            "settings": {
                "cases": {name: n_each for name in sources},
                "case_size": "512 x 512 x 134 at 1.07 x 1.07 x 3 mm",
                "model": model_info,
                "repeats_per_arm": repeats,
                "order": "interleaved " + ", ".join(ARMS) + ", ...",
                "precision": {arm: precision for arm, (_, precision) in ARMS.items()},
                "device": "cpu",
                "quick": args.quick,
            },
            "rows": rows,
            "summary": summary,
            "goal": {
                "target": f"pipelined bf16 folder wall time <= {TARGET_RATIO} x the sum of network (forward) time",
                "measured": {"wall_over_network": measured},
                **paired_goal(  # one folder run: a single measurement
                    f"wall / network <= {TARGET_RATIO}", [TARGET_RATIO], [measured], min_pairs=1
                ),
            },
        },
        quick=args.quick,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
