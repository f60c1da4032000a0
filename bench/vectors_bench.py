#!/usr/bin/env python3
"""Bench rows for using the vectors (issue #15): ``search`` over a synthetic OUTDIR of
1,000,000 × 512 float16 vectors, brute force and through the faiss index (recall@10 against
brute force), and ``dedup`` over 100,000 vectors: wall time and peak RSS above the process
baseline.

The synthetic vectors are clustered, but not so that an index has it easy (see
``make_outdir``): 50 topics, 4,000 clusters within them, every row far from its centre so
clusters overlap, 5% of rows in no cluster; each query is a stored row plus noise (never a
stored row). The index is searched with the nprobe ``clipcli index`` calibrated (the build row
shows every recall it measured), both kept loaded and read again for every query (what one
``clipcli search`` process does). The OUTDIR is written under a temporary directory (``--tmp``,
default /tmp) and deleted at the end. Every measured row runs in its own process; peak RSS is
that process's VmHWM minus its VmRSS after imports and opening the vectors (the baseline; torch
is imported before it, as the float16 search path uses torch: its import's RSS is recorded as
``torch_import_rss_mib``). Numbers are written to JSON and Markdown as measured.

    python bench/vectors_bench.py                          # the full rows (make bench)
    python bench/vectors_bench.py --rows 200000 --dedup-rows 20000 --out /tmp/v.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

TARGET_QUERY_S = 1.0
TARGET_RSS_MIB = 300
TARGET_RECALL = 0.95
TARGET_SPEEDUP = 20.0


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


TOPICS, CLUSTERS = 50, 4000
NOISE = (0.6, 1.4)  # per-row noise norm around its cluster centre (unit): clusters overlap
BACKGROUND = 0.05  # rows with no cluster at all
QUERY_NOISE = 0.6  # a query is a stored row plus noise of this norm: never a stored row itself
DUPLICATES = 0.01  # dedup rows: this share are near copies (cosine ≈ 0.999) of another row


def _unit(x: Any) -> Any:
    import numpy as np

    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_outdir(path: Path, rows: int, dim: int, *, seed: int = 0, duplicates: float = 0.0) -> int:
    """A batch-shaped OUTDIR (manifest, embeddings.npy float16, sources.txt) written in chunks.

    Not the easy case for an index: two levels of structure (topics, then clusters within
    them, like photo collections), each row far from its cluster centre (cosine to it about
    0.6-0.85, so clusters overlap and many lists hold a query's neighbours) and some rows in no
    cluster. ``duplicates``: that share of rows are near copies of an earlier row of their
    chunk (the planted duplicates dedup must find). Returns the number of planted copies.
    """
    import numpy as np

    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    topics = _unit(rng.standard_normal((TOPICS, dim)).astype(np.float32))
    centres = _unit(topics[rng.integers(0, TOPICS, CLUSTERS)] + _unit(rng.standard_normal((CLUSTERS, dim)).astype(np.float32)))
    matrix = np.lib.format.open_memmap(path / "embeddings.npy", mode="w+", dtype=np.float16, shape=(rows, dim))
    planted = 0
    with open(path / "sources.txt", "w") as sources:
        for first in range(0, rows, 65536):
            n = min(65536, rows - first)
            noise = rng.uniform(*NOISE, n).astype(np.float32)[:, None]
            block = _unit(centres[rng.integers(0, CLUSTERS, n)] + noise * _unit(rng.standard_normal((n, dim)).astype(np.float32)))
            lone = rng.random(n) < BACKGROUND
            block[lone] = _unit(rng.standard_normal((int(lone.sum()), dim)).astype(np.float32))
            copies = np.flatnonzero(rng.random(n) < duplicates)
            copies = copies[copies > 0]
            originals = (rng.random(len(copies)) * copies).astype(np.int64)
            block[copies] = _unit(block[originals] + 0.03 * _unit(rng.standard_normal((len(copies), dim)).astype(np.float32)))
            planted += len(copies)
            matrix[first : first + n] = block.astype(np.float16)
            sources.write("".join(f"/data/photos/{i // 1000:04d}/{i:07d}.jpg\n" for i in range(first, first + n)))
    matrix.flush()
    del matrix
    manifest = {"format": "clipcli-batch", "layout_version": 1, "status": "complete", "modality": "image",
                "model": "synthetic", "family": "clip", "feature": "projected", "normalized": True,
                "dtype": "float16", "dim": dim}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return planted


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measured row, in this (fresh) process."""
    import numpy as np

    from clipcli.vectors import index as ann
    from clipcli.vectors.scoring import duplicate_groups, top_k
    from clipcli.vectors.store import open_vectors

    rss_before_torch = _status_mib("VmRSS")
    import torch  # noqa: F401 - the float16 search path uses it; its import is part of the baseline

    torch_import_mib = round(_status_mib("VmRSS") - rss_before_torch, 1)
    vs = open_vectors(spec["vectors"])
    rng = np.random.default_rng(1)
    queries = [_unit(np.asarray(vs.matrix[int(r)], dtype=np.float32)
                     + QUERY_NOISE * _unit(rng.standard_normal(vs.dim).astype(np.float32)))
               for r in rng.integers(0, len(vs), spec.get("queries", 5))]
    baseline = _status_mib("VmRSS")
    out: dict[str, Any] = {"rows": len(vs), "dim": vs.dim, "dtype": str(vs.matrix.dtype),
                           "baseline_rss_mib": round(baseline, 1), "torch_import_rss_mib": torch_import_mib}
    if spec["kind"] == "brute":
        times, results = [], []
        top_k(vs.matrix, queries[0], 10, normalized=vs.normalized)  # warm the page cache
        cpu = []
        for q in queries:
            t, c = time.perf_counter(), time.process_time()
            hits = top_k(vs.matrix, q, 10, normalized=vs.normalized)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            results.append([h.row for h in hits])
        out.update(seconds=times, cpu_seconds=cpu, threads=_threads(), results=results)
    elif spec["kind"] == "build":
        t = time.perf_counter()
        built = ann.build(vs)
        out.update(seconds=[time.perf_counter() - t], index_rows=built.rows, calibration=built.calibration,
                   index_mib=round(ann.index_paths(vs)[0].stat().st_size / 2**20, 1))
    elif spec["kind"] == "index":
        # keep_loaded: the index is read once, as the vectors are opened once for brute force;
        # cold: read again for every query (what one `clipcli search` process does).
        keep = spec.get("keep_loaded", True)
        times, results = [], []
        ann.search(vs, queries[0], 10, nprobe=spec.get("nprobe"), keep_loaded=keep)
        cpu = []
        for q in queries:
            t, c = time.perf_counter(), time.process_time()
            hits = ann.search(vs, q, 10, nprobe=spec.get("nprobe"), keep_loaded=keep)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            results.append([h.row for h in hits])
        meta = ann.read_meta(vs) or {}
        out.update(seconds=times, cpu_seconds=cpu, results=results, nprobe=spec.get("nprobe") or ann.probes(meta),
                   nprobe_from="--nprobe" if spec.get("nprobe") else "calibrated at build", keep_loaded=keep)
    elif spec["kind"] == "dedup":
        t = time.perf_counter()
        groups = duplicate_groups(vs.matrix, spec["threshold"], normalized=vs.normalized)
        out.update(seconds=[time.perf_counter() - t], groups=len(groups), threshold=spec["threshold"],
                   grouped_rows=sum(len(g) for g in groups), planted=spec.get("planted"))
    out["peak_rss_above_baseline_mib"] = round(_status_mib("VmHWM") - baseline, 1)
    return out


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())


def run_row(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                          capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["(no output)"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        print(json.dumps(worker(json.loads(Path(argv[1]).read_text()))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--dedup-rows", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=30, help="queries per search row (recall@10 is averaged over them)")
    p.add_argument("--nprobe", type=int, default=None, help="default: the nprobe `clipcli index` calibrated")
    p.add_argument("--tmp", default=tempfile.gettempdir())
    p.add_argument("--no-dedup", action="store_true", help="skip the dedup row")
    p.add_argument("--out", default=str(HERE / "results" / "vectors.json"))
    args = p.parse_args(argv)
    report: dict[str, Any] = {"clipcli_bench": "vectors", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "command": " ".join(["vectors_bench.py", *argv]),
                              "hardware": {"cpu": platform.processor() or platform.machine(),
                                           "usable_cores": len(os.sched_getaffinity(0)),
                                           "python": platform.python_version(), "load_before": os.getloadavg()},
                              "rows": {}}
    with tempfile.TemporaryDirectory(prefix="clipcli-vectors-bench-", dir=args.tmp) as tmp:
        work = Path(tmp)
        out = work / "outdir"
        t = time.perf_counter()
        make_outdir(out, args.rows, args.dim)
        report["synthetic"] = {"rows": args.rows, "dim": args.dim, "dtype": "float16", "topics": TOPICS,
                               "clusters": CLUSTERS, "noise": NOISE, "background": BACKGROUND,
                               "query_noise": QUERY_NOISE,
                               "bytes": (out / "embeddings.npy").stat().st_size,
                               "made_in_s": round(time.perf_counter() - t, 1)}
        print(f"synthetic OUTDIR: {args.rows} x {args.dim} float16 in {report['synthetic']['made_in_s']} s", flush=True)
        rows = report["rows"]
        for name, spec in [
            ("search brute force", {"kind": "brute"}),
            ("index build", {"kind": "build"}),
            ("search with index", {"kind": "index", "nprobe": args.nprobe}),
            ("search with index, cold", {"kind": "index", "nprobe": args.nprobe, "keep_loaded": False}),
            ("dedup", {"kind": "dedup", "threshold": 0.95}),
        ]:
            if spec["kind"] == "dedup" and args.no_dedup:
                continue
            spec.update(vectors=str(out), queries=args.queries)
            if spec["kind"] == "dedup":  # its own, smaller OUTDIR, with planted near copies
                spec["planted"] = make_outdir(work / "dedup", args.dedup_rows, args.dim, seed=2, duplicates=DUPLICATES)
                spec["vectors"] = str(work / "dedup")
            rows[name] = run_row(spec, work)
            print(f"{name}: {json.dumps({k: v for k, v in rows[name].items() if k != 'results'})}", flush=True)
    brute = rows["search brute force"]
    for name in ("search with index", "search with index, cold"):
        indexed = rows[name]
        if "results" in brute and "results" in indexed:
            recalls = [len(set(a) & set(b)) / len(a) for a, b in zip(brute["results"], indexed["results"])]
            indexed["recall_at_10"] = round(sum(recalls) / len(recalls), 4)
            indexed["speedup"] = round(_median(brute["seconds"]) / _median(indexed["seconds"]), 1)
            if "cpu_seconds" in brute and "cpu_seconds" in indexed:
                # Load-independent: CPU time barely changes when other processes share the cores.
                # Brute force runs on `threads` threads, so on a quiet machine its wall time is
                # at least its CPU time / threads; the index search runs on one thread.
                indexed["cpu_speedup_bound"] = round(
                    _median(brute["cpu_seconds"]) / brute.get("threads", 1) / _median(indexed["cpu_seconds"]), 1)
    report["hardware"]["load_after"] = os.getloadavg()
    report["targets"] = targets(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if len(values) % 2 else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2


def targets(rows: dict[str, Any]) -> list[dict[str, Any]]:
    brute, indexed = rows.get("search brute force", {}), rows.get("search with index", {})
    cold = rows.get("search with index, cold", {})
    out = []
    if "seconds" in brute:
        med = _median(brute["seconds"])
        out.append({"target": f"brute force ≤ {TARGET_QUERY_S} s per query", "measured": f"{med:.3f} s (median)",
                    "met": med <= TARGET_QUERY_S})
        rss = brute["peak_rss_above_baseline_mib"]
        out.append({"target": f"brute force peak RSS ≤ {TARGET_RSS_MIB} MB above baseline", "measured": f"{rss} MiB",
                    "met": rss * 1.048576 <= TARGET_RSS_MIB})
    if "recall_at_10" in indexed:
        out.append({"target": f"index recall@10 ≥ {TARGET_RECALL} at ≥ {TARGET_SPEEDUP:.0f}× brute force",
                    "measured": f"recall {indexed['recall_at_10']}, {indexed['speedup']}×",
                    "met": indexed["recall_at_10"] >= TARGET_RECALL and indexed["speedup"] >= TARGET_SPEEDUP})
    if "recall_at_10" in cold:
        out.append({"target": "the same, index read for every query (cold)",
                    "measured": f"recall {cold['recall_at_10']}, {cold['speedup']}×",
                    "met": cold["recall_at_10"] >= TARGET_RECALL and cold["speedup"] >= TARGET_SPEEDUP})
    return out


def markdown(report: dict[str, Any]) -> str:
    syn, hw = report["synthetic"], report["hardware"]
    lines = [f"clipcli vectors bench — {report['when']} — `{report['command']}`",
             f"hardware: {hw['cpu']}, {hw['usable_cores']} cores, Python {hw['python']}; load average before/after "
             f"{[round(x, 2) for x in hw['load_before']]} / {[round(x, 2) for x in hw.get('load_after', [])]}",
             f"vectors: synthetic OUTDIR, {syn['rows']:,} × {syn['dim']} {syn['dtype']} "
             f"({syn['bytes'] / 2**20:,.0f} MiB; {syn.get('topics')} topics, {syn['clusters']} clusters, row noise "
             f"{syn.get('noise')}, {syn.get('background')} unclustered, queries a row plus noise "
             f"{syn.get('query_noise')}); peak RSS is above the process's "
             "RSS after imports (torch included) and opening the vectors", "",
             "| row | rows | time | peak RSS above baseline | notes |", "|---|---:|---:|---:|---|"]
    for name, row in report["rows"].items():
        if "error" in row:
            lines.append(f"| {name} | | | | error: {row['error']} |")
            continue
        secs = row["seconds"]
        per = f"{_median(secs):.3f} s" + (" / query (median)" if len(secs) > 1 else "")
        notes = []
        if "cpu_seconds" in row:
            notes.append(f"CPU {_median(row['cpu_seconds']):.4f} s / query (median)"
                         + (f" on {row['threads']} threads" if "threads" in row else ""))
        if name.startswith("search with index"):
            notes.append(f"nprobe {row['nprobe']} ({row.get('nprobe_from')}); recall@10 vs brute force "
                         f"{row.get('recall_at_10')}; {row.get('speedup')}× brute force (wall); "
                         f"≥ {row.get('cpu_speedup_bound')}× by CPU time (brute force CPU / threads ÷ index CPU); "
                         + ("index kept loaded" if row.get("keep_loaded") else "index read for every query"))
        if name == "index build":
            cal = row.get("calibration") or {}
            notes.append(f"IVF-SQ8, {row['index_mib']} MiB on disk; nprobe calibration (recall@10 of "
                         f"{cal.get('queries')} held-out rows, target {cal.get('target')}): {cal.get('measured')}")
        if name == "dedup":
            notes.append(f"threshold {row['threshold']}: {row['groups']} groups, {row.get('grouped_rows')} rows in "
                         f"them ({row.get('planted')} near copies planted)")
        if len(secs) > 1:
            notes.append("runs " + ", ".join(f"{s:.3f}" for s in secs))
        lines.append(f"| {name} | {row['rows']:,} | {per} | {row['peak_rss_above_baseline_mib']} MiB | {'; '.join(notes)} |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |" for t in report["targets"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
