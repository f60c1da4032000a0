"""Real runs of the installed ``clipcli`` console script and of ``python -m clipcli``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted(str(p) for p in (ROOT / "sample_images").iterdir() if p.suffix in (".jpg", ".png"))


def clipcli_exe() -> str:
    exe = Path(sys.executable).parent / "clipcli"
    found = str(exe) if exe.exists() else shutil.which("clipcli")
    assert found, "the clipcli console script is not installed"
    return found


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, **kwargs)


def test_help_is_fast_because_it_imports_no_torch():
    code = (
        "import sys\n"
        "from clipcli.cli import app\n"
        "for argv in (['--help'], ['embed-image', '--help'], ['embed-text', '--help'], ['config', '--help']):\n"
        "    try:\n"
        "        app(argv, prog_name='clipcli')\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (argv, e.code)\n"
        "heavy = [m for m in ('torch', 'transformers', 'PIL', 'requests') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    assert "Example:" in result.stdout


def test_installed_script_embeds_the_sample_images_quietly(tiny_model, tmp_path):
    out = tmp_path / "samples.npy"
    result = run([clipcli_exe(), "embed-image", *SAMPLES, "--model", tiny_model, "-o", str(out)])
    assert result.returncode == 0
    assert result.stdout == ""
    assert result.stderr == ""  # no transformers load reports, backend or Pillow warnings
    assert np.load(out).shape == (len(SAMPLES), 32)
    assert (tmp_path / "samples.sources.txt").read_text().splitlines() == SAMPLES


def test_pipe_into_head_ends_cleanly(tiny_model):
    script = f"'{clipcli_exe()}' embed-image {' '.join(SAMPLES * 20)} --model '{tiny_model}' --batch-size 2 | head -n 1"
    result = run(["bash", "-o", "pipefail", "-c", script])
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
    assert len(result.stdout.splitlines()) == 1
    assert json.loads(result.stdout)["source"] == SAMPLES[0]


def test_python_dash_m_reads_texts_from_stdin(tiny_model):
    result = run([sys.executable, "-m", "clipcli", "embed-text", "-", "--model", tiny_model, "--format", "tsv"],
                 input="a cat\na dog\n")
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [r[0] for r in rows] == ["a cat", "a dog"] and all(len(r) == 33 for r in rows)
    assert result.stderr == ""


def test_exit_codes_in_a_real_process(tiny_model, tmp_path):
    bad = run([clipcli_exe(), "embed-image", SAMPLES[0], str(tmp_path / "nope.jpg"), "--model", tiny_model])
    assert bad.returncode == 1 and bad.stderr == f"skipping {tmp_path / 'nope.jpg'}: no such file\n"
    assert len(bad.stdout.splitlines()) == 1
    missing = run([clipcli_exe(), "embed-image", SAMPLES[0], "--model", str(tmp_path / "no-model")])
    assert missing.returncode == 3
    assert missing.stderr.startswith("error: cannot load model") and missing.stderr.count("\n") == 1
    usage = run([clipcli_exe(), "embed-image", SAMPLES[0], "--feature", "wrong"])
    assert usage.returncode == 2 and "feature" in usage.stderr
