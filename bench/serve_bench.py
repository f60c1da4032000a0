"""Warm vs cold one-liners: what ``clipcli serve`` buys a shell loop.

Measures median wall time (over ``--runs`` runs) of:

- ``python -c pass`` and ``python -c "import torch"`` (the floor, and the cost every cold run pays);
- the cold one-liner ``clipcli embed-text "a cat" --no-server`` (imports torch, loads the model);
- the warm one-liner ``clipcli embed-text "a cat"`` with a server running (auto-detected), and
  ``clipcli embed-image IMAGE``;
- how long ``clipcli serve --detach`` takes to come up.

Without ``--model`` a tiny random CLIP checkpoint is built in a temporary directory (no network
needed); its load time is small, so the cold number is mostly import cost, a lower bound for a real
checkpoint. The server runs with its sockets in a temporary ``CLIPCLI_RUNTIME_DIR`` and is stopped
at the end.

    .venv/bin/python bench/serve_bench.py [--model DIR_OR_HUB_ID] [--runs 10] [--json]
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

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "sample_images" / "chelsea.jpg"


def clipcli_exe() -> str:
    exe = Path(sys.executable).parent / "clipcli"
    return str(exe) if exe.exists() else "clipcli"


def timed(cmd: list[str], env: dict[str, str], runs: int) -> dict[str, float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": runs}


def tiny_model(directory: Path) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_checkpoint  # the test suite's tiny checkpoint builder

    return str(build_tiny_checkpoint(directory / "tiny-clip"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory or hub id (default: a tiny random checkpoint)")
    parser.add_argument("--runs", type=int, default=10, help="runs per warm measurement (cold ones: half)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="clipcli-serve-bench-") as tmp:
        tmp_path = Path(tmp)
        model = args.model or tiny_model(tmp_path)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPCLI_")}
        env.update(CLIPCLI_RUNTIME_DIR=str(tmp_path / "run"), CLIPCLI_CONFIG=str(tmp_path / "config.toml"))
        exe = clipcli_exe()
        cold_runs = max(3, args.runs // 2)
        results: dict[str, object] = {"model": model, "cpus": os.cpu_count(), "load_average": os.getloadavg()}

        results["python -c pass"] = timed([sys.executable, "-c", "pass"], env, args.runs)
        results["python -c 'import torch'"] = timed([sys.executable, "-c", "import torch"], env, cold_runs)
        results["cold: embed-text 'a cat' --no-server"] = timed(
            [exe, "embed-text", "a cat", "--model", model, "--no-server"], env, cold_runs)
        results["cold: embed-image IMAGE --no-server"] = timed(
            [exe, "embed-image", str(IMAGE), "--model", model, "--no-server"], env, cold_runs)

        start = time.perf_counter()
        started = subprocess.run([exe, "serve", "--model", model, "--detach", "--idle-timeout", "300"], env=env,
                                 capture_output=True, text=True)
        if started.returncode != 0:
            raise SystemExit(f"clipcli serve --detach failed: {started.stderr}")
        results["serve --detach (until it answers)"] = {"median": time.perf_counter() - start, "runs": 1}
        try:
            timed([exe, "embed-text", "warm up", "--model", model], env, 1)
            results["warm: embed-text 'a cat'"] = timed([exe, "embed-text", "a cat", "--model", model], env, args.runs)
            results["warm: embed-image IMAGE"] = timed([exe, "embed-image", str(IMAGE), "--model", model], env,
                                                       args.runs)
            status = subprocess.run([exe, "serve", "status", "--json"], env=env, capture_output=True, text=True)
            served = json.loads(status.stdout)[0]
            results["server requests served"] = served["requests"]
        finally:
            subprocess.run([exe, "serve", "stop"], env=env, capture_output=True)

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"model: {results['model']}  ({results['cpus']} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in results['load_average'])})")  # type: ignore[union-attr]
    for name, value in results.items():
        if isinstance(value, dict) and "median" in value:
            spread = f"  (min {value['min']:.3f}, max {value['max']:.3f}, {value['runs']} runs)" if "min" in value else ""
            print(f"  {name:<42} {value['median']:7.3f} s{spread}")
    warm = results["warm: embed-text 'a cat'"]["median"]  # type: ignore[index]
    cold = results["cold: embed-text 'a cat' --no-server"]["median"]  # type: ignore[index]
    print(f"  warm one-liner is {cold / warm:.1f}x faster than cold (target: warm <= 0.3 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
