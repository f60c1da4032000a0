"""``clipcli batch --engine ray`` on a real local Ray instance (no mocks of Ray).

One Ray instance for the module (2 CPUs, a small object store, no dashboard), shut down at the
end. In-process runs reuse it; the interrupt test runs ``python -m clipcli batch`` in a
subprocess that joins it with ``--ray-address``. Everything is compared with ``--engine local``
on the same inputs. The "Ray not installed" path simulates the ImportError in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from batch_helpers import cli, manifest, result_of
from conftest import make_image


N_IMAGES = 80
ARGS = ["--shard-size", "2", "--batch-size", "2"]




def errors_of(out: Path) -> list[tuple[str, str, str]]:
    records = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    return sorted((r["source"], r["stage"], r["reason"]) for r in records)


def assert_same(a: Path, b: Path, atol: float = 1e-5) -> None:
    ma, sa, ia = result_of(a)
    mb, sb, ib = result_of(b)
    assert sa == sb and ia == ib  # same rows, same order, same index records
    assert ma.shape == mb.shape and ma.dtype == mb.dtype
    np.testing.assert_allclose(ma, mb, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def ray_address() -> Any:
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False,
        logging_level="ERROR", configure_logging=True,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("collection")
    for i in range(N_IMAGES):
        make_image(folder / f"img-{i:03d}.png", (40 + i % 7, 36), seed=i)
    return folder


@pytest.fixture(scope="module")
def local_reference(tiny_model: str, collection: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    result = cli(str(collection), "-o", str(out), "-m", tiny_model, *ARGS)
    assert result.exit_code == 0, result.stderr
    return out


# --------------------------------------------------------------------------- no Ray needed


def test_ray_not_installed_is_a_clear_usage_error(tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_image(tmp_path / "a.png")
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does without the extra
    out = tmp_path / "out"
    result = cli(str(tmp_path / "a.png"), "-o", str(out), "-m", tiny_model, "--engine", "ray")
    assert result.exit_code == 2
    assert "pip install 'clipcli[ray]'" in result.stderr and "--engine local" in result.stderr
    assert not out.exists()  # said before any work


def test_engine_usage_errors(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    out = tmp_path / "out"
    assert cli(str(tmp_path / "a.png"), "-o", str(out), "--engine", "spark").exit_code == 2
    result = cli(str(tmp_path / "a.png"), "-o", str(out), "--ray-address", "auto")
    assert result.exit_code == 2 and "--engine ray" in result.stderr
    assert not out.exists()


def test_base_install_never_imports_ray() -> None:
    code = (
        "import sys; import clipcli.cli, clipcli.batch, clipcli.batch.ray_engine, clipcli.batch.merge; "
        "from clipcli.cli import app; "
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------- on Ray


def test_images_equal_local_engine_failures_recorded_and_incremental(
    ray_address: str, tiny_model: str, tmp_path: Path
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(7):
        make_image(folder / f"{i}.png", (30 + 3 * i, 40), seed=i)
    (folder / "broken.jpg").write_text("not an image")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder}\n{tmp_path / 'missing.png'}\n")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    base = ["--from-file", str(listing), "-m", tiny_model, *ARGS]

    assert cli(*base, "-o", str(local)).exit_code == 1  # two inputs fail
    result = cli(*base, "-o", str(on_ray), "--engine", "ray")
    assert result.exit_code == 1, result.stderr
    assert_same(local, on_ray)
    assert errors_of(on_ray) == errors_of(local) and len(errors_of(on_ray)) == 2
    m = manifest(on_ray)
    assert m["status"] == "complete" and m["engine"]["name"] == "ray" and m["engine"]["workers"] == 1
    assert m["device"] == "cpu" and m["model_dtype"] == "float32"
    assert m["counts"]["embedded"] == 7 and m["counts"]["failed"] == 2

    # Incremental: only the new file goes to Ray; the failures are retried (and fail again).
    make_image(folder / "new.png", seed=50)
    assert cli(*base, "-o", str(local)).exit_code == 1
    result = cli(*base, "-o", str(on_ray), "--engine", "ray")
    assert result.exit_code == 1
    c = manifest(on_ray)["counts"]
    assert (c["embedded"], c["skipped"], c["failed"], c["rows"]) == (1, 7, 2, 8)
    assert_same(local, on_ray)

    # The settings guard holds for the Ray engine too, before Ray is asked for anything.
    result = cli(*base, "-o", str(on_ray), "--engine", "ray", "--feature", "projected")
    assert result.exit_code == 2 and "never mixed" in result.stderr


def test_texts_equal_local_engine(ray_address: str, tiny_model: str, tmp_path: Path) -> None:
    texts = tmp_path / "caps.txt"
    lines = ["the cat", "a dog", "", "the the cat " * 40, "dog", "ça et là"] + [f"cat {i}" for i in range(20)]
    texts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert cli("--texts", str(texts), "-o", str(local), "-m", tiny_model, "-b", "4").exit_code == 0
    result = cli("--texts", str(texts), "-o", str(on_ray), "-m", tiny_model, "-b", "4", "--engine", "ray")
    assert result.exit_code == 0, result.stderr
    assert "1 text(s) were cut to the model's maximum length" in result.stderr
    assert_same(local, on_ray)
    assert manifest(on_ray)["modality"] == "text"


def test_resources_checked_before_anything_is_written(ray_address: str, tiny_model: str, tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    out = tmp_path / "out"
    result = cli(str(tmp_path / "a.png"), "-o", str(out), "-m", tiny_model, "--engine", "ray", "--num-gpus-per-worker", "1")
    assert result.exit_code == 2 and "has 0" in result.stderr and "--num-gpus-per-worker 0" in result.stderr
    result = cli(str(tmp_path / "a.png"), "-o", str(out), "-m", tiny_model, "--engine", "ray", "--workers", "2")
    assert result.exit_code == 2 and "need 3 CPUs" in result.stderr
    assert not (out / "manifest.json").exists()


def test_sigint_then_resume_equals_uninterrupted(
    ray_address: str, tiny_model: str, collection: Path, local_reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = [str(collection), "-o", str(out), "-m", tiny_model, *ARGS, "--engine", "ray"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipcli", "batch", *args, "--ray-address", ray_address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    parts = lambda: sorted((out / "shards").glob("shard-*.jsonl")) if (out / "shards").is_dir() else []  # noqa: E731
    deadline = time.monotonic() + 120
    while not parts():
        if proc.poll() is not None:
            pytest.fail(f"ended before the first shard (rc {proc.returncode}):\n{proc.communicate()[1]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no shard within 120 s")
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert manifest(out)["status"] == "interrupted"
    kept = len(parts())
    assert 1 <= kept < N_IMAGES // 2

    result = cli(*args)  # in-process, on the module's Ray
    assert result.exit_code == 0, result.stderr
    counts = manifest(out)["counts"]
    assert counts["skipped"] >= 2 * kept - 1 and counts["embedded"] == N_IMAGES - counts["skipped"]
    assert_same(local_reference, out)
    assert not [p for p in (out / "shards").iterdir() if p.name.endswith(".tmp")]


def test_model_failing_on_the_workers_is_one_clear_error(ray_address: str, tiny_model: str, tmp_path: Path) -> None:
    import ray

    from clipcli.batch import BatchRunner, collect_images
    from clipcli.batch.ray_engine import RayEngine, RayOptions
    from clipcli.encoder import Encoder
    from clipcli.errors import ModelError

    make_image(tmp_path / "a.png")

    def unavailable() -> Any:  # e.g. a checkpoint path that exists on the driver only
        raise ModelError("cannot load model 'x' on this node")

    engine = RayEngine(RayOptions(encoder_factory=unavailable))
    runner = BatchRunner(tmp_path / "out", collect_images([str(tmp_path / "a.png")]))
    with pytest.raises(ModelError, match="^cannot load model 'x' on this node$"):
        runner.run(lambda: Encoder(tiny_model, device="cpu"), engine=engine)
    assert ray.is_initialized()  # the caller's Ray session is left running
