"""First-run throughput of several clipcli trees on the same 10,000 images, alternating.

    python bench/first_run_compare.py --work DIR --reps 4 --out FILE.json NAME=TREE [NAME=TREE ...]

Uses storage_bench's ``first_run`` (a full ``clipcli batch`` into a new OUTDIR, timed from outside)
and its one-image model-load run, so "beyond model loading" is comparable with storage_bench's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import storage_bench  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("trees", nargs="+", help="NAME=PATH of a clipcli checkout")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model, _ = storage_bench.model_and_template(HERE / ".cache", args.work)
    trees = dict(item.split("=", 1) for item in args.trees)
    report: dict = {"load_average_start": os.getloadavg(), "images": args.images, "runs": {}}
    load = storage_bench.measured(["batch", str(args.work / "one.png"), "-o", str(args.work / f"one-{os.getpid()}"),
                                   "-m", model, "--feature", "projected", "-q"], args.work)
    report["model_load_1_image_wall_s"] = load["wall_s"]
    for rep in range(1, args.reps + 1):
        for name, tree in trees.items():
            storage_bench.settle()  # the previous run's writeback (and the images' own) done
            run = storage_bench.first_run(args.work, model, args.images, tree)
            report["runs"][f"{name}_rep{rep}"] = {k: run[k] for k in ("wall_s", "peak_rss_mib", "wchar", "rc", "images", "images_per_s")}
            print(name, rep, run["wall_s"], run["rc"], flush=True)
    summary = {}
    for name in trees:
        walls = [report["runs"][f"{name}_rep{r}"]["wall_s"] for r in range(1, args.reps + 1)]
        later = walls[1:] or walls
        beyond = [w - load["wall_s"] for w in later]
        summary[name] = {"walls": walls, "mean_wall_s_reps_2_on": round(sum(later) / len(later), 3),
                         "images_per_s_beyond_model_load_reps_2_on": round(args.images * len(beyond) / sum(beyond), 1)}
    report["summary"] = summary
    report["load_average_end"] = os.getloadavg()
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
