"""``clipcli config ...`` through the CLI: settings commands, model inspection, new-model.

Every invocation goes through ``clipcli.cli.app`` with typer's CliRunner; stdout must carry
data only and every error must be one line on stderr with the documented exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from clipcli import settings as S
from clipcli.cli import app
from conftest import make_image

runner = CliRunner()


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, list(args), env=env)


def cfg_path() -> Path:
    return Path(os.environ["CLIPCLI_CONFIG"])


def one_line_error(result: Any) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# ------------------------------------------------------------------ path / show / get


def test_path_prints_the_settings_file() -> None:
    result = run("config", "path")
    assert result.exit_code == 0
    assert result.stdout == f"{cfg_path()}\n" and result.stderr == ""


def test_show_lists_every_key_with_its_origin() -> None:
    S.set_value("batch_size", "8", path=cfg_path())
    result = run("config", "show", env={"CLIPCLI_DEVICE": "cpu"})
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert str(cfg_path()) in lines[0]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert set(rows) == set(S.KEYS)
    assert rows["batch_size"] == ["8", "file"]
    assert rows["device"] == ["cpu", "env", "(CLIPCLI_DEVICE)"]
    assert rows["model"] == ["openai/clip-vit-base-patch32", "default"]
    assert rows["mean"] == ["none", "default"]


def test_show_json_structure() -> None:
    result = run("config", "show", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["path"] == str(cfg_path()) and data["exists"] is False
    assert set(data["settings"]) == set(S.KEYS)
    defaults = S.Settings()
    for key, entry in data["settings"].items():
        assert entry == {"value": getattr(defaults, key), "origin": "default"}


# key -> (file value, env text, flag text, expected JSON value per layer, expected `get` text per layer)
CLI_MATRIX: dict[str, dict[str, Any]] = {
    "model": {"file": "file/m", "env": "env/m", "flag": "flag/m",
              "json": {"file": "file/m", "env": "env/m", "flag": "flag/m"},
              "text": {"file": "file/m", "env": "env/m", "flag": "flag/m"}},
    "batch_size": {"file": "7", "env": "11", "flag": "13",
                   "json": {"file": 7, "env": 11, "flag": 13},
                   "text": {"file": "7", "env": "11", "flag": "13"}},
    "normalize": {"file": "true", "env": "no", "flag": "1",
                  "json": {"file": True, "env": False, "flag": True},
                  "text": {"file": "true", "env": "false", "flag": "true"}},
    "device": {"file": "cpu", "env": "cuda:1", "flag": "mps",
               "json": {"file": "cpu", "env": "cuda:1", "flag": "mps"},
               "text": {"file": "cpu", "env": "cuda:1", "flag": "mps"}},
    "mean": {"file": "0.1,0.2,0.3", "env": "0.4 0.5 0.6", "flag": "0.7,0.8,0.9",
             "json": {"file": [0.1, 0.2, 0.3], "env": [0.4, 0.5, 0.6], "flag": [0.7, 0.8, 0.9]},
             "text": {"file": "0.1,0.2,0.3", "env": "0.4,0.5,0.6", "flag": "0.7,0.8,0.9"}},
}
COMBOS = [(), ("file",), ("env",), ("flag",), ("file", "env"), ("file", "flag"), ("env", "flag"),
          ("file", "env", "flag")]


@pytest.mark.parametrize("key", list(CLI_MATRIX))
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "+".join(c) or "none")
def test_precedence_matrix_via_show_and_get(key: str, combo: tuple[str, ...]) -> None:
    case = CLI_MATRIX[key]
    if "file" in combo:
        assert run("config", "set", key, case["file"]).exit_code == 0
    env = {S.ENV_PREFIX + key.upper(): case["env"]} if "env" in combo else None
    flag = ["--flag", f"{key}={case['flag']}"] if "flag" in combo else []
    winner = combo[-1] if combo else None

    shown = run("config", "show", "--json", *flag, env=env)
    assert shown.exit_code == 0, shown.stderr
    entry = json.loads(shown.stdout)["settings"][key]
    default = getattr(S.Settings(), key)
    assert entry["value"] == (case["json"][winner] if winner else (list(default) if isinstance(default, tuple) else default))
    assert entry["origin"] == (winner or "default")

    got = run("config", "get", key, *flag, env=env)
    assert got.exit_code == 0, got.stderr
    default_text = {"model": S.DEFAULT_MODEL, "batch_size": "32", "normalize": "false", "device": "auto", "mean": ""}
    assert got.stdout == (case["text"][winner] if winner else default_text[key]) + "\n"
    assert got.stderr == ""


def test_get_json_and_dashed_key() -> None:
    S.set_value("mean", "0.5,0.25,0.125", path=cfg_path())
    result = run("config", "get", "mean", "--json")
    assert json.loads(result.stdout) == [0.5, 0.25, 0.125]
    assert json.loads(run("config", "get", "crop-size", "--json").stdout) is None
    assert run("config", "get", "out-dtype").stdout == "float32\n"


def test_get_output_reads_back_with_set() -> None:
    S.set_value("std", "0.2,0.3,0.4", path=cfg_path())
    text = run("config", "get", "std").stdout.strip()
    S.unset_value("std", path=cfg_path())
    assert run("config", "set", "std", text).exit_code == 0
    assert S.resolve().settings.std == (0.2, 0.3, 0.4)


@pytest.mark.parametrize("args", [("config", "get", "colour"), ("config", "show", "--flag", "colour=red"),
                                  ("config", "show", "--flag", "batch_size"),
                                  ("config", "get", "model", "--flag", "batch_size=0")])
def test_get_show_usage_errors(args: tuple[str, ...]) -> None:
    result = run(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    one_line_error(result)


def test_unknown_key_error_lists_valid_keys() -> None:
    line = one_line_error(run("config", "get", "colour"))
    assert all(key in line for key in S.KEYS)


# ------------------------------------------------------------------ set / unset


def test_set_unset_roundtrip_via_cli() -> None:
    result = run("config", "set", "batch-size", "64")
    assert result.exit_code == 0 and result.stdout == ""
    assert "batch_size = 64" in result.stderr
    assert run("config", "get", "batch_size").stdout == "64\n"
    assert json.loads(run("config", "show", "--json").stdout)["settings"]["batch_size"]["origin"] == "file"
    result = run("config", "unset", "batch_size")
    assert result.exit_code == 0 and result.stdout == "" and "removed batch_size" in result.stderr
    assert run("config", "get", "batch_size").stdout == "32\n"
    result = run("config", "unset", "batch_size")
    assert result.exit_code == 0 and "was not set" in result.stderr
    assert sorted(p.name for p in cfg_path().parent.iterdir()) == ["config.toml"]  # no temp files


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [("batch_size", "0", "expected an integer from 1 to 8192"), ("colour", "red", "valid keys: model"),
     ("feature", "both", "expected one of: pooled, projected"), ("mean", "1,2", "expected 3 numbers"),
     ("std", "0,1,1", "std values must be > 0"), ("resample", "sinc", "expected one of: nearest")],
)
def test_set_invalid_value_exit_2_file_byte_identical(key: str, value: str, expected: str) -> None:
    S.set_value("workers", "2", path=cfg_path())
    before = cfg_path().read_bytes()
    result = run("config", "set", key, value)
    assert result.exit_code == 2
    assert expected in one_line_error(result)
    assert cfg_path().read_bytes() == before
    assert sorted(p.name for p in cfg_path().parent.iterdir()) == ["config.toml"]


def test_set_warns_when_the_environment_overrides() -> None:
    result = run("config", "set", "device", "cpu", env={"CLIPCLI_DEVICE": "cuda"})
    assert result.exit_code == 0
    assert "CLIPCLI_DEVICE" in result.stderr and "precedence" in result.stderr


def test_unset_repairs_a_file_with_an_unknown_key() -> None:
    cfg_path().write_text('colour = "red"\nworkers = 3\n', encoding="utf-8")
    assert run("config", "show").exit_code == 2
    assert run("config", "unset", "colour").exit_code == 0
    assert run("config", "get", "workers").stdout == "3\n"


# ------------------------------------------------------------------ corrupt settings everywhere


@pytest.mark.parametrize(
    ("content", "expected"),
    [("batch_size = [\n", "not valid TOML"), ("batch_size = 0\n", "invalid value 0 for batch_size"),
     ('colour = "red"\n', "unknown settings key 'colour'")],
    ids=["corrupt", "invalid-value", "unknown-key"],
)
@pytest.mark.parametrize(
    "args",
    [("config", "show"), ("config", "show", "--json"), ("config", "get", "model"), ("config", "set", "workers", "2"),
     ("config", "model"), ("embed-image", "x.png"), ("embed-text", "hello")],
    ids=lambda a: "-".join(a[:2]),
)
def test_bad_settings_file_is_exit_2_for_every_command(content: str, expected: str, args: tuple[str, ...]) -> None:
    cfg_path().write_text(content, encoding="utf-8")
    before = cfg_path().read_bytes()
    result = run(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    line = one_line_error(result)
    assert str(cfg_path()) in line and expected in line
    assert result.stdout == ""
    assert cfg_path().read_bytes() == before


def test_path_works_with_a_corrupt_file() -> None:
    cfg_path().write_text("[[[", encoding="utf-8")
    assert run("config", "path").exit_code == 0


def test_config_show_does_not_import_torch_or_transformers(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from clipcli.cli import app\n"
        "r = CliRunner().invoke(app, ['config', 'show', '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(app, ['config', 'show'])\n"
        "assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(app, ['config', 'get', 'model'])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'PIL', 'numpy') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    env = dict(os.environ, CLIPCLI_CONFIG=str(tmp_path / "c.toml"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# ------------------------------------------------------------------ bad preprocessing values


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [("--mean", "0.5,0.5", "expected 3 numbers for the mean"),
     ("--mean", "0.1,0.2,0.3,0.4", "got 4"),
     ("--mean", "a,b,c", "expected 3 numbers"),
     ("--std", "0,1,1", "std values must be > 0"),
     ("--std", "1,1", "expected 3 numbers for the std"),
     ("--std", "inf,1,1", "finite"),
     ("--resize", "0", "expected an integer from 1 to 4096"),
     ("--crop-size", "-4", "expected an integer from 1 to 4096"),
     ("--resample", "sinc", "expected one of: nearest"),
     ("--preprocess", "inception", "expected one of: clip, imagenet")],
)
def test_bad_preprocessing_options_exit_2(tiny_model: str, tmp_path: Path, option: str, value: str, expected: str) -> None:
    image = make_image(tmp_path / "a.png")
    result = run("embed-image", str(image), "-m", tiny_model, f"{option}={value}")
    assert result.exit_code == 2
    assert expected in one_line_error(result)
    result = run("config", "model", tiny_model, f"{option}={value}")
    assert result.exit_code == 2
    assert expected in one_line_error(result)


@pytest.mark.parametrize(("key", "value"), [("std", "0,1,1"), ("mean", "1"), ("resize", "0"), ("crop_size", "x")])
def test_bad_preprocessing_settings_from_env_and_file_exit_2(tiny_model: str, tmp_path: Path, key: str, value: str) -> None:
    image = make_image(tmp_path / "a.png")
    result = run("embed-image", str(image), "-m", tiny_model, env={S.ENV_PREFIX + key.upper(): value})
    assert result.exit_code == 2 and S.ENV_PREFIX + key.upper() in one_line_error(result)
    cfg_path().write_text(f'{key} = "{value}"\n', encoding="utf-8")
    result = run("embed-image", str(image), "-m", tiny_model)
    assert result.exit_code == 2 and str(cfg_path()) in one_line_error(result)


# ------------------------------------------------------------------ flags win in the real commands


def test_flag_env_file_precedence_in_embed_image_metadata(tiny_model: str, tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.png")
    S.set_value("model", "file/does-not-exist", path=cfg_path())
    S.set_value("normalize", "false", path=cfg_path())
    S.set_value("mean", "0.1,0.1,0.1", path=cfg_path())
    env = {"CLIPCLI_MODEL": tiny_model, "CLIPCLI_NORMALIZE": "true", "CLIPCLI_MEAN": "0.2,0.2,0.2"}
    out = tmp_path / "env.json"
    assert run("embed-image", str(image), "-o", str(out), env=env).exit_code == 0
    meta = json.loads(out.read_text())
    assert meta["model"] == tiny_model and meta["normalized"] is True
    assert meta["preprocessing"]["mean"] == pytest.approx([0.2] * 3)
    out = tmp_path / "flag.json"
    result = run("embed-image", str(image), "-o", str(out), "--no-normalize", "--mean", "0.3,0.3,0.3", env=env)
    assert result.exit_code == 0, result.stderr
    meta = json.loads(out.read_text())
    assert meta["normalized"] is False
    assert meta["preprocessing"]["mean"] == pytest.approx([0.3] * 3)


@pytest.fixture(scope="module")
def model32(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny checkpoint whose vision tower takes 32x32 inputs (a 32 px crop fits it)."""
    from conftest import build_tiny_checkpoint

    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny32"), image_size=32))


def test_embed_image_records_custom_preprocessing(model32: str, tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.png", (50, 37))
    out = tmp_path / "out.json"
    result = run("embed-image", str(image), "-m", model32, "-o", str(out),
                 "--preprocess", "imagenet", "--resize", "40", "--crop-size", "32")
    assert result.exit_code == 0, result.stderr
    pre = json.loads(out.read_text())["preprocessing"]
    assert pre["preset"] == "imagenet" and pre["custom"] is True
    assert pre["resize_shortest_edge"] == 40 and pre["crop_size"] == [32, 32]
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert pre["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert pre["resample"] == "bicubic"
    # the same in NPZ metadata, and the settings file works as well as the flags
    S.set_value("preprocess", "imagenet", path=cfg_path())
    S.set_value("resize", "40", path=cfg_path())
    S.set_value("crop_size", "32", path=cfg_path())
    S.set_value("resample", "bilinear", path=cfg_path())
    npz = tmp_path / "out.npz"
    assert run("embed-image", str(image), "-m", model32, "-o", str(npz)).exit_code == 0
    with np.load(npz) as data:
        meta = json.loads(str(data["metadata"]))
    assert meta["preprocessing"] == pre | {"resample": "bilinear"}


def test_crop_size_other_than_the_model_input_size(tiny_model: str, tmp_path: Path) -> None:
    """A crop other than the model's image size interpolates the position embeddings."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModel

    image = make_image(tmp_path / "a.png", (50, 37))
    result = run("embed-image", str(image), "-m", tiny_model, "--crop-size", "32", "--resize", "40")
    assert result.exit_code == 0, result.stderr
    got = np.array(json.loads(result.stdout)["embedding"])
    processor = CLIPImageProcessor.from_pretrained(tiny_model, size={"shortest_edge": 40},
                                                   crop_size={"height": 32, "width": 32})
    inputs = processor(images=Image.open(image), return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape[-2:]) == (32, 32)
    with torch.no_grad():
        expected = CLIPVisionModel.from_pretrained(tiny_model)(**inputs, interpolate_pos_encoding=True).pooler_output[0]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ config model


def test_config_model_json_equals_the_checkpoint_config(tiny_model: str) -> None:
    from clipcli.encoder import load_config

    result = run("config", "model", tiny_model, "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    config = load_config(tiny_model)
    assert info["model"] == tiny_model and info["model_type"] == "clip"
    for name, value in info["vision"].items():
        assert value == getattr(config.vision_config, name), name
    for name, value in info["text"].items():
        assert value == getattr(config.text_config, name), name
    assert set(info["vision"]) == {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                   "image_size", "patch_size"}
    assert set(info["text"]) == {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                 "vocab_size", "max_position_embeddings"}
    assert info["projection_dim"] == config.projection_dim == 16
    assert info["features"] == {"pooled": {"vision": 32, "text": 32}, "projected": {"vision": 16, "text": 16}}
    pre = info["preprocessing"]
    assert pre["preset"] == "clip" and pre["custom"] is False
    assert pre["resize_shortest_edge"] == 30 and pre["crop_size"] == [30, 30]
    assert pre["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert pre["std"] == pytest.approx([0.26862954, 0.26130258, 0.27577711])
    assert pre["resample"] == "bicubic"


def test_config_model_table(tiny_model: str) -> None:
    result = run("config", "model", tiny_model)
    assert result.exit_code == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and (parts[-1].isdigit() or parts[-1] == "-"):
            rows[" ".join(parts[:-2])] = parts[-2:]
    assert rows["hidden size"] == ["32", "32"]
    assert rows["layers"] == ["2", "2"]
    assert rows["attention heads"] == ["4", "4"]
    assert rows["intermediate size"] == ["37", "37"]
    assert rows["image size"] == ["30", "-"]
    assert rows["patch size"] == ["2", "-"]
    assert rows["vocab size"] == ["-", "600"]
    assert rows["max positions"] == ["-", "77"]
    assert rows["pooled feature size"] == ["32", "32"]
    assert rows["projected feature size"] == ["16", "16"]
    assert "projection dim: 16" in result.stdout
    assert "resize shortest edge" in result.stdout and "30x30" in result.stdout and "bicubic" in result.stdout


def test_config_model_shows_preprocessing_overrides_from_flags_and_settings(tiny_model: str) -> None:
    S.set_value("model", tiny_model, path=cfg_path())
    S.set_value("preprocess", "imagenet", path=cfg_path())
    S.set_value("resize", "64", path=cfg_path())
    result = run("config", "model", "--json", "--crop-size", "48", "--resample", "nearest", "--std", "0.5,0.5,0.5")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["model"] == tiny_model  # MODEL defaults to the `model` setting
    pre = info["preprocessing"]
    assert pre["preset"] == "imagenet" and pre["custom"] is True
    assert pre["resize_shortest_edge"] == 64 and pre["crop_size"] == [48, 48]
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406]) and pre["std"] == pytest.approx([0.5] * 3)
    assert pre["resample"] == "nearest"
    table = run("config", "model", "--crop-size", "48").stdout
    assert "imagenet (customised)" in table and "48x48" in table


def test_config_model_missing_is_exit_3(tmp_path: Path) -> None:
    result = run("config", "model", str(tmp_path / "no-such-model"))
    assert result.exit_code == 3
    line = one_line_error(result)
    assert "no-such-model" in line
    assert result.stdout == ""


def test_config_model_not_clip_is_exit_3(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    result = run("config", "model", str(tmp_path))
    assert result.exit_code == 3
    line = one_line_error(result)
    assert "model_type 'bert'" in line and "supported families: CLIP" in line and "SigLIP" in line


# ------------------------------------------------------------------ new-model

TINY_ARGS = ["--vision-hidden-size", "24", "--vision-heads", "4", "--vision-layers", "1",
             "--vision-intermediate-size", "20", "--image-size", "16", "--patch-size", "4",
             "--vocab-size", "520", "--text-hidden-size", "20", "--text-heads", "2", "--text-layers", "1",
             "--text-intermediate-size", "30", "--max-positions", "16", "--projection-dim", "8", "--seed", "3"]


@pytest.fixture(scope="module")
def new_model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    directory = tmp_path_factory.mktemp("nm") / "model"
    result = run("config", "new-model", str(directory), *TINY_ARGS)
    return directory, result


def test_new_model_writes_a_checkpoint(new_model_dir: tuple[Path, Any]) -> None:
    directory, result = new_model_dir
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{directory}\n"
    assert "randomly initialised" in result.stderr
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json"} <= names
    config = json.loads((directory / "config.json").read_text())
    assert config["projection_dim"] == 8
    assert config["vision_config"]["hidden_size"] == 24 and config["vision_config"]["patch_size"] == 4
    assert config["text_config"]["max_position_embeddings"] == 16 and config["text_config"]["vocab_size"] == 520


@pytest.mark.parametrize(("feature", "dims"), [("pooled", (24, 20)), ("projected", (8, 8))])
def test_new_model_embeds_images_and_texts(new_model_dir: tuple[Path, Any], tmp_path: Path, feature: str,
                                           dims: tuple[int, int]) -> None:
    directory, _ = new_model_dir
    images = [make_image(tmp_path / "a.png", (40, 30)), make_image(tmp_path / "b.jpg", (9, 21), seed=1)]
    result = run("embed-image", *map(str, images), "-m", str(directory), "--feature", feature)
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [len(r["embedding"]) for r in rows] == [dims[0]] * 2
    assert all(np.isfinite(r["embedding"]).all() for r in rows)
    out = tmp_path / "t.json"
    long_text = "a very long text " * 20  # longer than --max-positions 16: cut, with a warning
    result = run("embed-text", "a cat", "ünïcode ✓", long_text, "-m", str(directory), "--feature", feature,
                 "-o", str(out))
    assert result.exit_code == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["dim"] == dims[1] and data["max_text_length"] == 16
    assert [len(item["embedding"]) for item in data["items"]] == [dims[1]] * 3
    assert "cut to 16 tokens" in result.stderr


def test_new_model_projected_matches_clipmodel(new_model_dir: tuple[Path, Any]) -> None:
    """The saved projections are what --feature projected uses (not re-initialised ones)."""
    import torch
    from transformers import CLIPModel

    from clipcli.encoder import Encoder

    directory, _ = new_model_dir
    encoder = Encoder(str(directory), device="cpu", feature="projected")
    ids, _ = encoder.tokenize(["a cat"])
    got = encoder.encode_token_ids(ids)
    model = CLIPModel.from_pretrained(directory).eval()
    with torch.no_grad():
        out = model.get_text_features(input_ids=torch.tensor(ids))
    expected = (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_new_model_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    result = run("config", "new-model", str(target), *TINY_ARGS)
    assert result.exit_code == 2
    assert "--force" in one_line_error(result)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    result = run("config", "new-model", str(target), *TINY_ARGS, "--force", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["projection_dim"] == 8 and summary["parameters"] > 0
    assert (target / "config.json").exists() and (target / "notes.txt").read_text() == "mine"


def test_new_model_refuses_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    result = run("config", "new-model", str(target), *TINY_ARGS)
    assert result.exit_code == 2 and "not a directory" in one_line_error(result)


@pytest.mark.parametrize(
    ("change", "expected"),
    [(["--vision-hidden-size", "25"], "vision hidden_size 25 is not divisible by num_attention_heads 4"),
     (["--text-heads", "3"], "text hidden_size 20 is not divisible by num_attention_heads 3"),
     (["--image-size", "18"], "image_size 18 is not divisible by patch_size 4"),
     (["--patch-size", "32"], "image_size 16 is not divisible by patch_size 32"),
     (["--vision-layers", "0"], "vision num_hidden_layers must be positive"),
     (["--projection-dim", "0"], "projection_dim must be positive"),
     (["--max-positions", "2"], "max_position_embeddings must be at least 3"),
     (["--vocab-size", "100"], "vocab_size 100 is smaller than the tokenizer's 514 tokens")],
)
def test_new_model_invalid_combinations_exit_2(tmp_path: Path, change: list[str], expected: str) -> None:
    target = tmp_path / "bad"
    result = run("config", "new-model", str(target), *TINY_ARGS, *change)
    assert result.exit_code == 2
    assert expected in one_line_error(result)
    assert not target.exists()


def test_new_model_tokenizer_from(tiny_model: str, tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(tiny_model)
    target = tmp_path / "copied"
    too_small = [*TINY_ARGS, "--vocab-size", str(len(reference) - 1)]
    result = run("config", "new-model", str(target), *too_small, "--tokenizer-from", tiny_model)
    assert result.exit_code == 2
    assert f"smaller than the tokenizer's {len(reference)} tokens" in one_line_error(result)
    result = run("config", "new-model", str(target), *TINY_ARGS, "--vocab-size", "600", "--tokenizer-from", tiny_model)
    assert result.exit_code == 0, result.stderr
    copied = CLIPTokenizer.from_pretrained(target)
    assert copied.get_vocab() == reference.get_vocab()
    assert copied("the cat")["input_ids"] == reference("the cat")["input_ids"]


def test_new_model_tokenizer_from_missing_is_exit_3(tmp_path: Path) -> None:
    result = run("config", "new-model", str(tmp_path / "x"), *TINY_ARGS, "--tokenizer-from", str(tmp_path / "nope"))
    assert result.exit_code == 3
    assert "cannot load a tokenizer" in one_line_error(result)


@pytest.mark.parametrize("command", ["show", "get", "set", "unset", "path", "model", "new-model"])
def test_every_command_help_has_an_example(command: str) -> None:
    result = run("config", command, "--help")
    assert result.exit_code == 0
    assert "Example:" in result.stdout
