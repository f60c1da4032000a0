#!/usr/bin/env python3
"""clipcli benchmark (``make bench``): clipcli against the model-only ceiling and a naive pipeline.

On the same inputs, in one run, it measures and prints a table (Markdown), and writes it with
the hardware description to ``bench/results/latest.json``:

* **ceiling**: model-only forward throughput on ready-made pixel tensors / token ids;
* **naive**: open each image, ``CLIPImageProcessor``, forward, one batch after another (texts:
  tokenise with ``padding="max_length"`` to 77, forward);
* **clipcli**: the library pipeline (``embed_images`` / ``embed_texts``, steady state) and the
  CLI end to end (``embed-image``, ``embed-text``, ``batch`` when present) on files;
* where time goes on one core (decode, processor, clipcli's exact re-implementation, draft decode);
* opt-in speed-ups with their fidelity: reduced-size JPEG decoding (``fast_decode``), CPU int8;
* start-up time of ``clipcli --help`` and ``clipcli config show`` (median of several runs);
* peak RSS of ``embed-image``/``batch`` on 10× more (small) images: memory must stay flat;
* on a machine with CUDA, GPU rows (ViT-B/32 and ViT-L/14, float32 and bfloat16) automatically.

Every measured row runs in its own process (so its peak RSS is its own). Inputs are generated
and cached in ``bench/.cache`` (random-weight checkpoints, photo-like JPEGs, captions): no
network is needed. Throughput rows exclude imports and model loading; CLI rows are reported
net of a one-input run of the same command (start-up and model load), with the raw wall-clock
rate in the notes. Timings are only as quiet as the machine: see ``load_average`` in the JSON.

    python bench/run.py --quick                  # a minute or two: fewer images and texts
    python bench/run.py                          # the full run (make bench)
    python bench/run.py --arch vit-l-14 --device cuda --dtype bfloat16
    python bench/run.py --only images,texts --sizes 640x480
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import inputs  # noqa: E402

GROUPS = ("images", "where", "texts", "int8", "compile", "start", "memory", "gpu", "vectors")
TARGETS_E2E = {"640x480": 0.9, "1920x1080": 0.9, "12MP": 0.8}
FIDELITY_TOL = 1e-5


# ------------------------------------------------------------------------------ processes


def spawn(cmd: list[str], *, env: dict[str, str] | None = None, stdin: str | None = None,
          timeout: float = 1800, cwd: str | None = None) -> dict[str, Any]:
    """Run ``cmd``; return rc, wall seconds, the child's own peak RSS (MiB) and output tails."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        stdin_file = open(stdin, "rb") if stdin else subprocess.DEVNULL
        try:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdin=stdin_file, stdout=out, stderr=err, env=env, cwd=cwd)
            waited: list[Any] = []
            ended = {"at": 0.0}

            def wait() -> None:  # blocking wait4: exact end time and the child's own rusage
                waited.append(os.wait4(proc.pid, 0))
                ended["at"] = time.perf_counter()

            waiter = threading.Thread(target=wait, daemon=True)
            waiter.start()
            waiter.join(timeout)
            if waiter.is_alive():
                proc.kill()
                waiter.join()
            _, status, rusage = waited[0]
            wall = ended["at"] - start
            proc.returncode = -9 if wall > timeout else os.waitstatus_to_exitcode(status)
        finally:
            if stdin:
                stdin_file.close()
        out.seek(0)
        err.seek(0)
        maxrss = rusage.ru_maxrss / (1024 if sys.platform.startswith("linux") else 1024 * 1024)
        return {
            "rc": proc.returncode,
            "wall": wall,
            "cpu_s": rusage.ru_utime + rusage.ru_stime,
            "peak_rss_mib": round(maxrss, 1),
            "stdout": out.read().decode("utf-8", "replace")[-4000:],
            "stderr": err.read().decode("utf-8", "replace")[-4000:],
        }


def clean_env() -> dict[str, str]:
    """The environment for child processes: offline, no user settings, no CLIPCLI_* overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPCLI_")}
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["CLIPCLI_CONFIG"] = str(WORK / "empty-config.toml")
    # An empty runtime directory: a `clipcli serve` running on this machine is not found, so the
    # CLI rows measure the command itself, not a warm server.
    env["CLIPCLI_RUNTIME_DIR"] = str(WORK / "runtime")
    if ARGS.threads:  # the CLI has no threads flag: torch follows OMP_NUM_THREADS
        env["OMP_NUM_THREADS"] = str(ARGS.threads)
    return env


def clipcli_exe() -> str:
    exe = Path(sys.executable).parent / "clipcli"
    return str(exe) if exe.exists() else (shutil.which("clipcli") or "clipcli")


def run_worker(spec: dict[str, Any], repeat: int = 1) -> dict[str, Any]:
    """Run one in-process row in a fresh worker process; return its result (best of ``repeat``)."""
    spec_path = WORK / f"spec-{spec['id']}.json"
    spec["result"] = str(WORK / f"result-{spec['id']}.json")
    spec["repeat"] = repeat
    spec_path.write_text(json.dumps(spec))
    proc = spawn([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)], env=clean_env(),
                 timeout=ARGS.row_timeout)
    if proc["rc"] != 0 or not Path(spec["result"]).exists():
        tail = (proc["stderr"].strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"worker failed (exit {proc['rc']}): {tail}"}
    result = json.loads(Path(spec["result"]).read_text())
    result["peak_rss_mib"] = proc["peak_rss_mib"]
    return result


def worker_main(spec_path: str) -> None:
    import warnings

    warnings.simplefilter("ignore")
    import rows

    spec = json.loads(Path(spec_path).read_text())
    best: dict[str, Any] | None = None
    for _ in range(max(1, int(spec.get("repeat", 1)))):
        rows.CPU_SECONDS[:] = []
        result = rows.ROWS[spec["kind"]](spec)
        if rows.CPU_SECONDS and result.get("items"):
            result["cpu_s"] = rows.CPU_SECONDS[0]
        if best is None or (result["seconds"] and result["seconds"] < best["seconds"]):
            best = result
    Path(spec["result"]).write_text(json.dumps(best))


# ------------------------------------------------------------------------------ description


def hardware() -> dict[str, Any]:
    import PIL
    import torch
    import transformers
    from PIL import features

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        if hasattr(os, "sysconf") else None,
        "torch": torch.__version__,
        "torch_threads": ARGS.threads or torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "numpy": __import__("numpy").__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------ the plan


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cache = Path(args.cache_dir)
        self.rows: list[dict[str, Any]] = []
        self.counter = 0

    # --- bookkeeping
    def add(self, group: str, name: str, inp: str, result: dict[str, Any], *, unit: str, **extra: Any) -> dict[str, Any]:
        row: dict[str, Any] = {"idx": len(self.rows), "group": group, "row": name, "input": inp, "unit": unit, **extra}
        if "error" in result:
            row["error"] = result["error"]
        else:
            items, seconds = result.get("items", 0), result.get("seconds", 0.0)
            row["items"] = items
            row["seconds"] = round(seconds, 4)
            row["rate"] = items / seconds if seconds else None
            if result.get("cpu_s") is not None and items:
                row["cpu_ms_per_item"] = round(1000 * result["cpu_s"] / items, 2)
            for key, value in result.items():
                if key not in ("items", "seconds"):
                    row[key] = value
        self.rows.append(row)
        shown = f"{row['rate']:.2f} {unit}/s" if row.get("rate") else row.get("error", "")
        print(f"  {group:8s} {name:34s} {inp:18s} {shown}", flush=True)
        return row

    def worker(self, kind: str, **spec: Any) -> tuple[dict[str, Any], str]:
        self.counter += 1
        vec = str(WORK / f"vectors-{self.counter}.npy")
        spec = {"id": self.counter, "kind": kind, "vectors": vec, "keep": inputs.DISTINCT,
                "threads": self.args.threads, **spec}
        return run_worker(spec, self.args.repeat), vec

    def model(self, arch: str | None = None) -> str:
        if self.args.model and arch in (None, self.args.arch):
            return self.args.model
        return inputs.ensure_model(self.cache, arch or self.args.arch)

    def image_size(self, arch: str | None = None) -> int:
        if self.args.model and arch in (None, self.args.arch):
            config = json.loads((Path(self.args.model) / "config.json").read_text())
            vision = config.get("vision_config", config)
            return int(vision.get("image_size", 224))
        return int(inputs.ARCHS[arch or self.args.arch].vision.get("image_size", 224))

    # --- groups
    def images(self, device: str, dtype: str, arch: str, group: str = "images", sizes: list[str] | None = None,
               cli: bool = True, extras: bool = True, n_images: int | None = None, batch: int | None = None) -> None:
        a = self.args
        n_images, batch = n_images or a.images, batch or a.batch_size
        model, isize = self.model(arch), self.image_size(arch)
        common = {"model": model, "device": device, "dtype": dtype, "batch": batch, "image_size": isize}
        label = f"{arch}, {device}, {dtype}, batch {batch}"
        ceiling_paths = inputs.ensure_images(self.cache, "640x480", inputs.DISTINCT)
        n_ceiling = max(n_images, 2 * batch, 50 * batch if device.startswith("cuda") else 0)
        res, _ = self.worker("image_ceiling", n=n_ceiling, paths=ceiling_paths, **common)
        ceiling = self.add(group, f"ceiling: model only ({label})", "pixel tensors", res, unit="img")
        for size in sizes or a.sizes:
            paths = inputs.ensure_images(self.cache, size, n_images)
            res, naive_vec = self.worker("image_naive", paths=paths, **common)
            naive = self.add(group, "naive: open+processor+forward", size, res, unit="img", ceiling_of=ceiling["idx"])
            res, exact_vec = self.worker("image_pipeline", paths=paths, **common)
            row = self.add(group, "clipcli pipeline (exact, default)", size, res, unit="img",
                           ceiling_of=ceiling["idx"], naive_of=naive["idx"])
            self.compare(row, exact_vec, naive_vec, "vs naive")
            if extras:
                if not a.quick:
                    res, vec = self.worker("image_pipeline", paths=paths, processor=True, **common)
                    r = self.add(group, "clipcli pipeline, HF processor", size, res, unit="img",
                                 ceiling_of=ceiling["idx"], naive_of=naive["idx"])
                    self.compare(r, vec, naive_vec, "vs naive")
                res, vec = self.worker("image_pipeline", paths=paths, fast_decode=True, **common)
                r = self.add(group, "clipcli pipeline --fast-decode (opt-in)", size, res, unit="img",
                             ceiling_of=ceiling["idx"], naive_of=naive["idx"])
                self.compare(r, vec, exact_vec, "vs exact")
            if cli:
                self.cli_images(group, size, paths, model, device, dtype, ceiling, naive)

    def cli_images(self, group: str, size: str, paths: list[str], model: str, device: str, dtype: str,
                   ceiling: dict[str, Any], naive: dict[str, Any] | None, batch: int | None = None,
                   extra: dict[str, Any] | None = None) -> None:
        exe = clipcli_exe()
        opts = ["--model", model, "--device", device, "--dtype", dtype,
                "--batch-size", str(batch or self.args.batch_size)]
        one = inputs.ensure_images(self.cache, size, 1)
        runs = {
            "embed-image": lambda ps, out: [exe, "embed-image", *ps, "-o", str(out / "v.npy"), *opts],
        }
        if self.batch_available():
            runs["batch"] = lambda ps, out: [exe, "batch", str(Path(ps[0]).parent), "-o", str(out / "outdir"), *opts]
        for name, make in runs.items():
            base = self.cli_run(make, one)
            full = self.cli_run(make, paths)
            if "error" in full or "error" in base:
                self.add(group, f"clipcli {name} (CLI)", size, {"error": full.get("error") or base.get("error")}, unit="img",
                         **(extra or {}))
                continue
            net = max(full["wall"] - base["wall"], 1e-6)
            result = {"items": len(paths) - 1, "seconds": net, "peak_rss_mib": full["peak_rss_mib"],
                      "cpu_s": max(full["cpu_s"] - base["cpu_s"], 0.0),
                      "note": f"wall {len(paths) / full['wall']:.2f} img/s incl. start+load {base['wall']:.1f} s"}
            self.add(group, f"clipcli {name} (CLI, net of start)", size, result, unit="img",
                     ceiling_of=ceiling["idx"], naive_of=naive["idx"] if naive else None, **(extra or {}))
        if not self.batch_available():
            self.add(group, "clipcli batch (CLI)", size, {"error": "skipped: `clipcli batch --help` failed"}, unit="img")

    def cli_run(self, make: Any, paths: list[str]) -> dict[str, Any]:
        """Run a CLI command on ``paths``: the fastest of ``--repeat`` runs, each in a fresh output."""
        best: dict[str, Any] | None = None
        for _ in range(max(1, self.args.repeat)):
            out = Path(tempfile.mkdtemp(dir=WORK))
            try:
                proc = spawn(make(paths, out), env=clean_env(), timeout=self.args.row_timeout)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            if proc["rc"] != 0:
                tail = (proc["stderr"].strip().splitlines() or ["(no output)"])[-1]
                return {"error": f"exit {proc['rc']}: {tail[:200]}"}
            if best is None or proc["wall"] < best["wall"]:
                best = proc
        assert best is not None
        return best

    _batch: bool | None = None

    def batch_available(self) -> bool:
        if self._batch is None:
            proc = spawn([clipcli_exe(), "batch", "--help"], env=clean_env(), timeout=60)
            self._batch = proc["rc"] == 0
        return self._batch

    def where(self) -> None:
        """Single-thread cost per image of each preprocessing step (no model)."""
        model = self.model()
        for size in self.args.sizes:
            paths = inputs.ensure_images(self.cache, size, inputs.DISTINCT)
            res, _ = self.worker("preprocess", model=model, device="cpu", paths=paths, n=4 if self.args.quick else 8)
            if "error" in res:
                self.add("where", "per image, 1 thread (ms)", size, res, unit="ms")
                continue
            parts = [f"{k[:-3].replace('_', ' ')} {res[k]:.1f}" for k in
                     ("decode_ms", "processor_ms", "exact_reimpl_ms", "decode_draft_ms", "draft_reimpl_ms") if k in res]
            if "draft_pixels_max_abs" in res:
                parts.append(f"draft vs exact pixels: max abs diff {res['draft_pixels_max_abs']:.3f}, "
                             f"mean abs diff {res['draft_pixels_mean_abs']:.4f} (normalised units)")
            row = self.add("where", "per image, 1 thread (ms)", size, {"items": 0, "seconds": 0.0, **res}, unit="ms",
                           note="; ".join(parts))
            row["rate"] = None

    def compiled(self, device: str, dtype: str) -> None:
        a = self.args
        model, isize = self.model(), self.image_size()
        common = {"model": model, "device": device, "dtype": dtype, "batch": a.batch_size, "image_size": isize}
        ceiling_paths = inputs.ensure_images(self.cache, "640x480", inputs.DISTINCT)
        n = max(a.images, 2 * a.batch_size)
        res, eager_vec = self.worker("image_ceiling", n=n, paths=ceiling_paths, **common)
        eager = self.add("compile", "model only, eager", "pixel tensors", res, unit="img")
        res, vec = self.worker("image_ceiling", n=n, paths=ceiling_paths, compile=True, **common)
        row = self.add("compile", "model only, torch.compile (opt-in)", "pixel tensors", res, unit="img")
        row["speedup_of"], row["speedup_vs"] = eager["idx"], "eager"
        self.compare(row, vec, eager_vec, "vs eager")
        paths = inputs.ensure_images(self.cache, "640x480", a.images)
        res, _ = self.worker("image_pipeline", paths=paths, compile=True, **common)
        self.add("compile", "clipcli pipeline, --compile (opt-in)", "640x480", res, unit="img", ceiling_of=eager["idx"])

    def texts(self, device: str, dtype: str) -> None:
        a = self.args
        model = self.model()
        common = {"model": model, "device": device, "dtype": dtype, "batch": a.batch_size}
        for kind in ("short", "long"):
            texts = inputs.captions(a.texts, kind, seed=1 if kind == "short" else 2)
            label = f"{kind} captions"
            res, _ = self.worker("text_ceiling", texts=texts, **common)
            ceiling = self.add("texts", "ceiling: model only (bucketed ids)", label, res, unit="text")
            res, naive_vec = self.worker("text_naive", texts=texts, **common)
            naive = self.add("texts", "naive: pad to 77 + forward", label, res, unit="text", ceiling_of=ceiling["idx"])
            res, vec = self.worker("text_pipeline", texts=texts, **common)
            row = self.add("texts", "clipcli pipeline (bucketed)", label, res, unit="text",
                           ceiling_of=ceiling["idx"], naive_of=naive["idx"])
            self.compare(row, vec, naive_vec, "vs naive")
            # CLI, net of a one-text run
            exe = clipcli_exe()
            text_file = WORK / f"captions-{kind}.txt"
            text_file.write_text("\n".join(texts) + "\n")
            one_file = WORK / f"captions-{kind}-1.txt"
            one_file.write_text(texts[0] + "\n")
            opts = ["--model", model, "--device", device, "--dtype", dtype, "--batch-size", str(a.batch_size), "-q"]
            base = self.cli_run(lambda _p, out: [exe, "embed-text", "--file", str(one_file), "-o", str(out / "t.npy"), *opts], [])
            full = self.cli_run(lambda _p, out: [exe, "embed-text", "--file", str(text_file), "-o", str(out / "t.npy"), *opts], [])
            if "error" in full or "error" in base:
                self.add("texts", "clipcli embed-text (CLI)", label, {"error": full.get("error") or base.get("error")}, unit="text")
            else:
                net = max(full["wall"] - base["wall"], 1e-6)
                self.add("texts", "clipcli embed-text (CLI, net of start)", label,
                         {"items": len(texts) - 1, "seconds": net, "peak_rss_mib": full["peak_rss_mib"],
                          "cpu_s": max(full["cpu_s"] - base["cpu_s"], 0.0),
                          "note": f"wall {len(texts) / full['wall']:.1f} text/s incl. start+load {base['wall']:.1f} s"},
                         unit="text", ceiling_of=ceiling["idx"], naive_of=naive["idx"])

    def int8(self) -> None:
        a = self.args
        model = self.model()
        paths = inputs.ensure_images(self.cache, "640x480", inputs.DISTINCT)
        common = {"model": model, "device": "cpu", "dtype": "float32", "batch": a.batch_size,
                  "image_size": self.image_size(), "n": max(a.images, 2 * a.batch_size), "paths": paths}
        res, _ = self.worker("image_ceiling", **common)
        f32 = self.add("int8", "vision model only, float32", "pixel tensors", res, unit="img")
        res, _ = self.worker("image_ceiling", quantize="int8", compare_float32=True, **common)
        row = self.add("int8", "vision model only, int8 (opt-in)", "pixel tensors", res, unit="img")
        row["speedup_of"] = f32["idx"]
        texts = inputs.captions(a.texts, "long", seed=2)
        tcommon = {"model": model, "device": "cpu", "dtype": "float32", "batch": a.batch_size, "texts": texts}
        res, _ = self.worker("text_ceiling", **tcommon)
        f32 = self.add("int8", "text model only, float32", "long captions", res, unit="text")
        res, _ = self.worker("text_ceiling", quantize="int8", compare_float32=True, **tcommon)
        row = self.add("int8", "text model only, int8 (opt-in)", "long captions", res, unit="text")
        row["speedup_of"] = f32["idx"]
        ipaths = inputs.ensure_images(self.cache, "640x480", a.images)
        res, _ = self.worker("image_pipeline", model=model, device="cpu", dtype="float32", batch=a.batch_size,
                             image_size=self.image_size(), paths=ipaths, quantize="int8")
        self.add("int8", "clipcli pipeline, int8 (opt-in)", "640x480", res, unit="img")

    def start(self) -> None:
        exe = clipcli_exe()
        runs = max(3, self.args.start_runs)
        for name, cmd in (("clipcli --help", [exe, "--help"]), ("clipcli config show", [exe, "config", "show"])):
            walls = []
            for _ in range(runs):
                proc = spawn(cmd, env=clean_env(), timeout=60)
                if proc["rc"] != 0:
                    walls = []
                    break
                walls.append(proc["wall"])
            probe = (
                "import sys\nfrom clipcli.cli import app\n"
                f"try:\n    app({cmd[1:]!r}, prog_name='clipcli')\nexcept SystemExit:\n    pass\n"
                "print('heavy=' + ','.join(m for m in ('torch', 'transformers', 'PIL') if m in sys.modules), file=sys.stderr)\n"
            )
            imported = spawn([sys.executable, "-c", probe], env=clean_env(), timeout=60)["stderr"]
            heavy = next((line.split("=", 1)[1] for line in imported.splitlines() if line.startswith("heavy=")), "?")
            if not walls:
                self.add("start", name, "-", {"error": f"exit {proc['rc']}"}, unit="s")
                continue
            median = statistics.median(walls)
            row = self.add("start", name, f"median of {runs}", {"items": 0, "seconds": median}, unit="s",
                           note=f"imports: {heavy or 'no torch/transformers/PIL'}; runs {', '.join(f'{w:.2f}' for w in walls)}")
            row["rate"] = None
            row["median_s"] = round(median, 3)

    def memory(self) -> None:
        small, big = (200, 2000) if self.args.quick else (1000, 10000)
        model = self.model("tiny")
        exe = clipcli_exe()
        opts = ["--model", model, "--device", "cpu", "-q"]
        results: dict[str, dict[int, dict[str, Any]]] = {}
        for n in (small, big):
            paths = inputs.ensure_images(self.cache, "64x64", n)
            listing = WORK / f"list-{n}.txt"
            listing.write_text("\n".join(paths) + "\n")
            out = Path(tempfile.mkdtemp(dir=WORK))
            proc = spawn([exe, "embed-image", "-", "-o", str(out / "v.npy"), *opts], env=clean_env(),
                         stdin=str(listing), timeout=self.args.row_timeout)
            results.setdefault("embed-image", {})[n] = proc
            if self.batch_available():
                proc = spawn([exe, "batch", str(Path(paths[0]).parent), "-o", str(out / "outdir"), *opts],
                             env=clean_env(), timeout=self.args.row_timeout)
                results.setdefault("batch", {})[n] = proc
            shutil.rmtree(out, ignore_errors=True)
        for name, by_n in results.items():
            for n, proc in by_n.items():
                if proc["rc"] != 0:
                    tail = (proc["stderr"].strip().splitlines() or ["?"])[-1]
                    self.add("memory", f"{name} peak RSS", f"{n} × 64x64", {"error": f"exit {proc['rc']}: {tail[:160]}"}, unit="img")
                    continue
                self.add("memory", f"{name} peak RSS (tiny model)", f"{n} × 64x64",
                         {"items": n, "seconds": proc["wall"], "peak_rss_mib": proc["peak_rss_mib"],
                          "note": "throughput: wall clock incl. start-up"}, unit="img")

    def gpu(self) -> None:
        """Model-only and end-to-end images/s on the GPU, per architecture, bfloat16 and float32.

        End to end is the library pipeline on JPEG files decoded on the CPU (what embed-image and
        batch run); the naive pipeline and the CLI rows run for the first architecture only.
        """
        a = self.args
        n = 512 if a.quick else a.gpu_images
        batch = a.gpu_batch_size
        for i, arch in enumerate(a.gpu_archs):
            model = self.model(arch)
            for dtype in ("bfloat16", "float32"):
                common = {"model": model, "device": a.gpu_device, "dtype": dtype, "batch": batch,
                          "image_size": self.image_size(arch)}
                label = f"{arch}, {a.gpu_device}, {dtype}, batch {batch}"
                ceiling_paths = inputs.ensure_images(self.cache, "640x480", inputs.DISTINCT)
                res, _ = self.worker("image_ceiling", n=max(n, 20 * batch), paths=ceiling_paths, max_seconds=4.0, **common)
                ceiling = self.add("gpu", f"ceiling: model only ({label})", "pixel tensors", res, unit="img",
                                   arch=arch, dtype=dtype)
                for size in a.gpu_sizes:
                    # Larger images decode slower: fewer of them keep each row a few seconds long.
                    count = n if size == "640x480" else max(n // 4, 2 * batch)
                    paths = inputs.ensure_images(self.cache, size, count)
                    naive = None
                    if i == 0 and a.gpu_naive_images and (dtype == "bfloat16" or size == a.gpu_sizes[0]):
                        naive_paths = paths[: a.gpu_naive_images]
                        res, naive_vec = self.worker("image_naive", paths=naive_paths, **common)
                        naive = self.add("gpu", "naive: open+processor+forward", size, res, unit="img",
                                         ceiling_of=ceiling["idx"], arch=arch, dtype=dtype)
                    if i == 0 and dtype == "bfloat16":  # the CPU side alone: what it can feed the GPU
                        res, _ = self.worker("image_loader", paths=paths, **common)
                        self.add("gpu", "loading only: read+decode+preprocess", size, res, unit="img",
                                 ceiling_of=ceiling["idx"], arch=arch, dtype=dtype)
                    res, vec = self.worker("image_pipeline", paths=paths, **common)
                    row = self.add("gpu", "clipcli pipeline (exact, default)", size, res, unit="img",
                                   ceiling_of=ceiling["idx"], naive_of=naive["idx"] if naive else None,
                                   arch=arch, dtype=dtype)
                    if naive:
                        self.compare(row, vec, naive_vec, "vs naive")
                    if i == 0 and dtype == "bfloat16" and size == a.gpu_sizes[0] and a.gpu_cli:
                        self.cli_images("gpu", size, paths, model, a.gpu_device, dtype, ceiling, naive,
                                        batch=batch, extra={"arch": arch, "dtype": dtype})

    # --- fidelity
    def compare(self, row: dict[str, Any], vec: str, ref: str, label: str) -> None:
        import numpy as np

        if "error" in row or not Path(vec).exists() or not Path(ref).exists():
            return
        a, b = np.load(vec), np.load(ref)
        n = min(len(a), len(b))
        a, b = a[:n], b[:n]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        row["max_abs_" + label.replace(" ", "_")] = float(np.abs(a - b).max())
        row["min_cosine_" + label.replace(" ", "_")] = float(cos.min())


# ------------------------------------------------------------------------------ report


def finish(bench: Bench, info: dict[str, Any], started: float, load_before: Any) -> dict[str, Any]:
    by_id = {r["idx"]: r for r in bench.rows}
    for row in bench.rows:
        for key, out in (("ceiling_of", "x_ceiling"), ("naive_of", "x_naive"), ("speedup_of", "x_speedup")):
            other = by_id.get(row.pop(key, None))
            if other is not None and row.get("rate") and other.get("rate"):
                row[out] = round(row["rate"] / other["rate"], 3)
    add_bounds(bench.rows)
    targets = evaluate_targets(bench.rows)
    return {
        "clipcli_bench": 1,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": {k: v for k, v in vars(bench.args).items() if k != "worker"},
        "hardware": info,
        "load_average": {"before": load_before, "after": load_average()},
        "duration_s": round(time.time() - started, 1),
        "rows": bench.rows,
        "targets": targets,
    }


def add_bounds(rows: list[dict[str, Any]]) -> None:
    """Where time goes, as a bound: on a CPU-only run every core serves both the forward pass
    and the decoding, so ``× ceiling`` cannot exceed forward CPU / (forward CPU + preprocessing
    CPU) per image, however the work is overlapped."""
    ceiling = next((r for r in rows if r["group"] == "images" and r["row"].startswith("ceiling")
                    and ", cpu," in r["row"] and r.get("cpu_ms_per_item")), None)
    if ceiling is None:
        return
    forward = ceiling["cpu_ms_per_item"]
    for row in rows:
        if row["group"] != "where" or "exact_reimpl_ms" not in row:
            continue
        exact = row["decode_ms"] + row["exact_reimpl_ms"]
        fast = row.get("decode_draft_ms", 0.0) + row.get("draft_reimpl_ms", 0.0)
        row["bound_exact"] = round(forward / (forward + exact), 3)
        row["bound_fast_decode"] = round(forward / (forward + fast), 3)
        row["note"] = (f"CPU-bound limit with a {forward:.0f} ms/img forward: ≤ {row['bound_exact']:.2f}× ceiling exact, "
                       f"≤ {row['bound_fast_decode']:.2f}× with --fast-decode; " + row.get("note", ""))


def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def find(group: str, prefix: str, inp: str | None = None) -> list[dict[str, Any]]:
        return [r for r in rows if r["group"] == group and r["row"].startswith(prefix)
                and (inp is None or r["input"] == inp) and r.get("rate")]

    for size, goal in TARGETS_E2E.items():
        for prefix, label in (("clipcli pipeline (exact", "pipeline, exact (default)"),
                              ("clipcli batch", "batch CLI, net of start"),
                              ("clipcli embed-image", "embed-image CLI, net of start"),
                              ("clipcli pipeline --fast-decode", "pipeline, --fast-decode (opt-in)")):
            for r in find("images", prefix, size):
                if "x_ceiling" in r:
                    out.append({"target": f"{label} ≥ {goal}× ceiling on {size}", "measured": r["x_ceiling"],
                                "met": r["x_ceiling"] >= goal})
    for r in find("texts", "clipcli pipeline", "short captions"):
        if "x_naive" in r:
            same = r.get("max_abs_vs_naive", 1.0) <= FIDELITY_TOL
            out.append({"target": "texts ≥ 3× naive pad-to-77 on short captions, identical vectors (≤1e-5)",
                        "measured": f"{r['x_naive']}×, max abs diff {r.get('max_abs_vs_naive', float('nan')):.1e}",
                        "met": r["x_naive"] >= 3 and same})
    for r in rows:
        if r["group"] == "start" and r.get("median_s") is not None:
            out.append({"target": f"`{r['row']}` < 0.3 s", "measured": f"{r['median_s']:.3f} s", "met": r["median_s"] < 0.3})
    mem = [r for r in rows if r["group"] == "memory" and r.get("peak_rss_mib")]
    for name in ("embed-image", "batch"):
        pair = [r for r in mem if r["row"].startswith(name)]
        if len(pair) == 2:
            ratio = pair[1]["peak_rss_mib"] / pair[0]["peak_rss_mib"]
            out.append({"target": f"{name} peak RSS flat: {pair[1]['input']} within 10% of {pair[0]['input']}",
                        "measured": f"{pair[0]['peak_rss_mib']:.0f} → {pair[1]['peak_rss_mib']:.0f} MiB ({ratio:.2f}×)",
                        "met": ratio <= 1.10})
    for r in rows:
        if r["group"] == "int8" and "x_speedup" in r:
            out.append({"target": f"{r['row']}: ≥ 1.3× float32, min cosine ≥ 0.999",
                        "measured": f"{r['x_speedup']}×, min cos {r.get('min_cosine_vs_float32', float('nan')):.5f}",
                        "met": r["x_speedup"] >= 1.3 and r.get("min_cosine_vs_float32", 0) >= 0.999})
    # GPU targets (H100-class): ViT-B/32 end to end with CPU decoding, and model-only bfloat16.
    for r in rows:
        if r["group"] != "gpu" or not r.get("rate") or "vit-b-32" not in r.get("arch", ""):
            continue
        if r["row"].startswith("ceiling") and "bfloat16" in r["row"]:
            out.append({"target": "GPU ViT-B/32 model only, bfloat16 ≥ 30,000 img/s",
                        "measured": f"{r['rate']:,.0f} img/s", "met": r["rate"] >= 30000})
        elif r["row"].startswith(("clipcli pipeline", "clipcli batch")) and r.get("dtype") == "bfloat16":
            out.append({"target": f"GPU ViT-B/32 {r['row']} on {r['input']} JPEGs ≥ 2,500 img/s",
                        "measured": f"{r['rate']:,.0f} img/s", "met": r["rate"] >= 2500})
    for r in rows:
        if r["group"] == "images" and "max_abs_vs_naive" in r and "exact" in r["row"]:
            out.append({"target": f"default pipeline equals the naive (reference) vectors ≤1e-5 on {r['input']}",
                        "measured": f"{r['max_abs_vs_naive']:.1e}", "met": r["max_abs_vs_naive"] <= FIDELITY_TOL})
    return out


def fmt_rate(row: dict[str, Any]) -> str:
    if row.get("error"):
        return "—"
    if row["group"] == "start":
        return f"{row['median_s']:.3f} s"
    if row["group"] == "where":
        return "—"
    rate = row.get("rate")
    if rate is None:
        return "—"
    return f"{rate:,.1f} {row['unit']}/s" if rate < 1000 else f"{rate:,.0f} {row['unit']}/s"


def fidelity(row: dict[str, Any]) -> str:
    parts = []
    for key, label in (("max_abs_vs_naive", "max abs diff vs naive"), ("max_abs_vs_eager", "max abs diff vs eager"),
                       ("min_cosine_vs_exact", "min cos vs exact"),
                       ("max_abs_vs_exact", "max abs diff vs exact"), ("min_cosine_vs_float32", "min cos vs fp32")):
        if key in row:
            value = row[key]
            parts.append(f"{label} {value:.1e}" if "abs" in key else f"{label} {value:.5f}")
    return ", ".join(parts)


def table(report: dict[str, Any]) -> str:
    hw = report["hardware"]
    lines = [
        f"clipcli benchmark — {report['when']} — `{report['command']}`",
        f"hardware: {hw['cpu']}, {hw['usable_cores']} cores, torch {hw['torch']} ({hw['torch_threads']} threads), "
        f"transformers {hw['transformers']}, Pillow {hw['pillow']}"
        + (" (libjpeg-turbo)" if hw.get("libjpeg_turbo") else "")
        + (f", GPU {hw['cuda']}" if hw.get("cuda") else "")
        + f"; load average before/after {report['load_average']['before']} / {report['load_average']['after']}",
        _settings_line(report["settings"], any(r["group"] == "gpu" for r in report["rows"])),
        "",
        "| group | row | input | n | throughput | × ceiling | × naive | CPU ms/item | peak RSS | fidelity / notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["rows"]:
        notes = "; ".join(p for p in (fidelity(row), row.get("note", ""), row.get("error", "")) if p)
        if "x_speedup" in row:
            notes = f"{row['x_speedup']:.2f}× {row.get('speedup_vs', 'float32')}; " + notes
        rss = f"{row['peak_rss_mib']:,.0f} MiB" if row.get("peak_rss_mib") else ""
        lines.append(
            f"| {row['group']} | {row['row']} | {row['input']} | {row.get('items', '') or ''} | {fmt_rate(row)} | "
            f"{_x(row, 'x_ceiling')} | {_x(row, 'x_naive')} | {row.get('cpu_ms_per_item', '')} | {rss} | {notes} |"
        )
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for t in report["targets"]:
        measured = f"{t['measured']:.2f}×" if isinstance(t["measured"], float) else t["measured"]
        lines.append(f"| {t['target']} | {measured} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


def _settings_line(st: dict[str, Any], gpu_rows: bool) -> str:
    model = st["model"] or st["arch"] + " (random weights)"
    line = f"model: {model}, batch size {st['batch_size']}, device {st['device']}, dtype {st['dtype']}"
    if st.get("groups") == ["gpu"]:  # a GPU-only run: the CPU settings above do not apply
        line = (f"model: {', '.join(st['gpu_archs'])} (random weights), batch size {st['gpu_batch_size']}, "
                f"device {st.get('gpu_device', 'cuda')}, dtype per row")
    elif gpu_rows:
        line += f"; GPU rows: {', '.join(st['gpu_archs'])}, batch size {st['gpu_batch_size']}"
    return line


def _x(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.2f}" if key in row else ""


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer images and texts, no HF-processor comparison row")
    p.add_argument("--arch", default="vit-b-32", choices=[a for a in inputs.ARCHS if a != "tiny"],
                   help="architecture of the random-weight checkpoint built for the run (default vit-b-32)")
    p.add_argument("--model", default=None,
                   help="a local CLIP checkpoint directory to measure instead (e.g. real weights, for int8 fidelity)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16 (auto: float32 on CPU)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--gpu-batch-size", type=int, default=256, help="batch size of the GPU rows")
    p.add_argument("--gpu-archs", default="vit-b-32,vit-l-14", help="architectures of the GPU rows")
    p.add_argument("--gpu-sizes", default="640x480,1920x1080", help="image sizes of the GPU rows")
    p.add_argument("--gpu-images", type=int, default=4096,
                   help="640x480 images per GPU pipeline row (a quarter of that for larger sizes)")
    p.add_argument("--gpu-naive-images", type=int, default=512,
                   help="images of the naive GPU rows (first architecture; 0: none)")
    p.add_argument("--gpu-device", default="cuda", help=argparse.SUPPRESS)  # to try the GPU rows elsewhere
    p.add_argument("--no-gpu-cli", dest="gpu_cli", action="store_false",
                   help="no embed-image/batch CLI rows on the GPU")
    p.add_argument("--images", type=int, default=None, help="images per size (default 96, quick 32)")
    p.add_argument("--texts", type=int, default=None, help="captions per kind (default 512, quick 256)")
    p.add_argument("--sizes", default=",".join(inputs.SIZES), help="comma-separated: " + ", ".join(inputs.SIZES))
    p.add_argument("--only", default=None, help="comma-separated groups: " + ", ".join(GROUPS))
    p.add_argument("--skip", default="", help="comma-separated groups to leave out")
    p.add_argument("--no-gpu", action="store_true", help="no automatic GPU rows even where CUDA is available")
    p.add_argument("--compile", action="store_true",
                   help="add torch.compile rows (model only and pipeline on 640x480; compiling takes minutes on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads in the workers (default: torch's)")
    p.add_argument("--repeat", type=int, default=None,
                   help="time each throughput row N times and keep the fastest: worker rows within their "
                        "process, CLI rows as fresh commands (default 3, quick 1); this machine's noise is "
                        "several percent from one process to the next")
    p.add_argument("--start-runs", type=int, default=7, help="runs of each start-up command (median)")
    p.add_argument("--row-timeout", type=float, default=1800)
    p.add_argument("--cache-dir", default=str(HERE / ".cache"))
    p.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.images = args.images or (32 if args.quick else 96)
    args.texts = args.texts or (256 if args.quick else 512)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.gpu_archs = [s.strip() for s in args.gpu_archs.split(",") if s.strip()]
    args.gpu_sizes = [s.strip() for s in args.gpu_sizes.split(",") if s.strip()]
    for arch in args.gpu_archs:
        if arch not in inputs.ARCHS:
            p.error(f"unknown architecture {arch!r} (expected {', '.join(inputs.ARCHS)})")
    for s in args.sizes:
        if s not in inputs.SIZES:
            p.error(f"unknown size {s!r} (expected {', '.join(inputs.SIZES)})")
    groups = set(GROUPS if args.only is None else [g.strip() for g in args.only.split(",")])
    unknown = groups - set(GROUPS) | (set(filter(None, args.skip.split(","))) - set(GROUPS))
    if unknown:
        p.error(f"unknown group(s) {', '.join(sorted(unknown))} (expected {', '.join(GROUPS)})")
    if "compile" in groups and not args.compile and args.only is None:
        groups.discard("compile")  # slow on CPU: only with --compile or --only compile
    args.groups = [g for g in GROUPS if g in groups and g not in args.skip.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    global ARGS, WORK
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker_main(argv[1])
        return 0
    # --- batch storage (issue #16): `run.py --storage [--quick]` runs bench/storage_bench.py alone.
    if "--storage" in argv:
        rest = [a for a in argv if a != "--storage"]
        return subprocess.call([sys.executable, str(HERE / "storage_bench.py"), *rest])
    # --- end batch storage
    ARGS = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.time()
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="clipcli-bench-") as tmp:
        WORK = Path(tmp)
        (WORK / "empty-config.toml").write_text("")
        (WORK / "runtime").mkdir(mode=0o700)
        info = hardware()
        print(f"clipcli bench: {info['cpu']}, {info['usable_cores']} cores, torch {info['torch']} "
              f"({info['torch_threads']} threads); groups: {', '.join(ARGS.groups)}", flush=True)
        bench = Bench(ARGS)
        print("preparing inputs (cached in bench/.cache) ...", flush=True)
        bench.model()
        for size in ARGS.sizes:
            inputs.ensure_images(bench.cache, size, ARGS.images)
        device, dtype = ARGS.device, ARGS.dtype
        for group in ARGS.groups:
            if group == "images":
                bench.images(device, dtype, ARGS.arch)
            elif group == "where":
                bench.where()
            elif group == "texts":
                bench.texts(device, dtype)
            elif group == "int8":
                bench.int8()
            elif group == "start":
                bench.start()
            elif group == "memory":
                bench.memory()
            elif group == "compile":
                bench.compiled(device, dtype)
            elif group == "vectors":
                # Issue #15's rows (search / index / dedup over synthetic vectors): their own
                # script and report (bench/vectors_bench.py), beside this one's.
                vectors_out = Path(ARGS.out).with_name("vectors.json")
                cmd = [sys.executable, str(HERE / "vectors_bench.py"), "--out", str(vectors_out)]
                if ARGS.quick:
                    cmd += ["--rows", "100000", "--dedup-rows", "10000", "--queries", "3"]
                subprocess.run(cmd, check=False)
            elif group == "gpu" and not ARGS.no_gpu:
                import torch

                if torch.cuda.is_available() or ARGS.gpu_device != "cuda":
                    bench.gpu()
                else:
                    print("gpu: no CUDA device here, no GPU rows", flush=True)
        report = finish(bench, info, started, load_before)
    out = Path(ARGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    text = table(report)
    out.with_suffix(".md").write_text(text + "\n")
    print()
    print(text)
    print(f"\nwritten: {out} (and {out.with_suffix('.md').name})")
    return 0


ARGS: argparse.Namespace
WORK: Path

if __name__ == "__main__":
    sys.exit(main())
