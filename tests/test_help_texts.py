"""Every command's real ``--help``, rendered as a user sees it (issue #17, the first hour).

The command tree is found from the Typer app itself, so a command added later is checked too:
no Python type labels (``<bool>``, ``<list[str]>``, ``{inputs}...``), no metavar on a flag,
bracketed text such as ``pip install 'clipcli[ray]'`` shown whole (rich markup must not eat
it), an example in ``serve status`` / ``serve stop``; ``--flag true`` refused; shell completion.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from clipcli.cli import app

ENV = {"COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"}
runner = CliRunner()
# Typer's type labels: <bool> <str> <int> <float> <path> <list[str]> <int range> <choice>...
TYPE_LABEL = re.compile(r"<(?:bool|str|text|int|float|path|choice|list\[[^\]]*\]|\w+ range)>")


def _commands() -> list[tuple[tuple[str, ...], object]]:
    """(path, click command) for every command and subcommand, batch merge/check included."""

    root = typer.main.get_command(app)
    found: list[tuple[tuple[str, ...], object]] = []

    def walk(command: object, path: tuple[str, ...]) -> None:
        found.append((path, command))
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, (*path, name))

    walk(root, ())
    # `batch merge`, `check`, `export`, `compact` are dispatched by batch's own make_context, not a group.
    from clipcli.cli.batch_cmd import SUBCOMMANDS, subcommand

    found.extend((("batch", name), subcommand(name)) for name in SUBCOMMANDS)
    return found


COMMANDS = _commands()


def render_help(path: tuple[str, ...]) -> str:
    result = runner.invoke(app, [*path, "--help"], env=ENV, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def flat(text: str) -> str:
    """Rendered help with panel borders removed and wrapped lines joined."""
    return " ".join(text.replace("│", " ").replace("╭", " ").replace("╰", " ").split())


def test_the_walk_finds_every_command() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    for expected in ("", "embed-image", "embed-text", "batch", "batch merge", "batch check", "batch export", "batch compact", "search", "config",
                     "config show", "config new-model", "serve", "serve status", "serve stop"):
        assert expected in names


@pytest.mark.parametrize("path", [path for path, _ in COMMANDS], ids=lambda p: " ".join(p) or "clipcli")
def test_help_has_no_type_labels_and_no_metavar_on_flags(path: tuple[str, ...]) -> None:
    text = render_help(path)
    assert not TYPE_LABEL.search(text), TYPE_LABEL.search(text)
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert not re.search(r"\{\w+\}", usage), usage  # {inputs}...
    command = dict(COMMANDS)[path]
    lines = text.splitlines()
    for param in command.params:  # type: ignore[attr-defined]
        if not getattr(param, "is_flag", False) or param.hidden or not param.help:
            continue
        opt = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        row = next(line for line in lines
                   if line.startswith("│") and line.replace("│", " ").replace("*", " ").split()[:1] == [opt])
        rest = [token for token in row.replace("│", " ").split() if not token.startswith("-")]
        first_word = re.sub(r"\\", "", param.help.split()[0])
        assert rest and rest[0] == first_word, f"{opt} shows a value: {row.strip()}"


@pytest.mark.parametrize("path", [path for path, _ in COMMANDS], ids=lambda p: " ".join(p) or "clipcli")
def test_bracketed_text_in_help_renders_whole(path: tuple[str, ...]) -> None:
    """`pip install 'clipcli[ray]'`, `[default]`-like text: shown as written, not taken as markup."""
    command = dict(COMMANDS)[path]
    # The raw strings as the code declares them (before the central escaping added backslashes).
    raw = [command.help or ""] + [p.help or "" for p in command.params]  # type: ignore[attr-defined]
    raw = [text.replace("\\[", "[") for text in raw]
    shown = flat(render_help(path))
    for text in raw:
        for hint in re.findall(r"pip install '[^']*'", text):
            assert hint in shown
        for bracketed in re.findall(r"\[[^\]\s]+\]", text):
            assert bracketed in shown, f"{bracketed} vanished from {' '.join(path)} --help"


def test_the_ray_install_hint_is_whole_in_batch_help() -> None:
    assert "needs pip install 'clipcli[ray]'." in flat(render_help(("batch",)))


def test_metavars_are_the_usual_ones() -> None:
    text = render_help(("embed-image",))
    assert "Usage: root embed-image [OPTIONS] INPUT..." in flat(text) or "embed-image [OPTIONS] INPUT..." in text
    rows = {line.split()[1]: line for line in text.splitlines() if line.startswith("│ --")}
    expect = {"--output": "PATH", "--timeout": "SECONDS", "--max-bytes": "BYTES", "--batch-size": "N",
              "--model": "MODEL", "--normalize": None, "--fail-fast": None, "--help": None}
    for opt, metavar in expect.items():
        row = rows[opt]
        if metavar is None:
            assert not re.search(r"\s[A-Z][A-Z|,]+\s", row.split("  ", 2)[-1].split(".")[0][:30]), row
        else:
            assert f" {metavar} " in row, row
    batch = flat(render_help(("batch",)))
    assert "--shard-size N" in batch or re.search(r"--shard-size\s+N\s", batch)


@pytest.mark.parametrize("path", [("serve", "status"), ("serve", "stop")])
def test_serve_status_and_stop_help_have_an_example(path: tuple[str, ...]) -> None:
    text = flat(render_help(path))
    assert re.search(rf"Example: clipcli {' '.join(path)}\b", text), text


# ------------------------------------------------------------------ --flag true


@pytest.mark.parametrize("args", [
    ["embed-image", "--normalize", "true"],
    ["embed-text", "--fail-fast", "false", "a cat"],
    ["batch", "--hash", "yes", "-o", "out"],
])
def test_a_flag_given_a_value_is_refused(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    flag, value = args[1], args[2]
    # A missing model proves the refusal comes first: loading it would be exit 3.
    result = runner.invoke(app, [*args, "-m", str(tmp_path / "no-such-model")], env=ENV)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert lines == [f"error: {value}: no such file (flags take no value: {flag}, not {flag} {value}; "
                     f"an input literally named {value!r} goes after --)"]
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_an_existing_file_named_true_is_still_an_input(tiny_model: str, images: list[Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(images[0], tmp_path / "true")
    result = runner.invoke(app, ["embed-image", "--normalize", "true", "-m", tiny_model], env=ENV)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith('{"source": "true"')


def test_after_double_dash_true_is_a_text(tiny_model: str) -> None:
    result = runner.invoke(app, ["embed-text", "--normalize", "-m", tiny_model, "--", "true"], env=ENV)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith('{"source": "true"')


# ------------------------------------------------------------------ shell completion


def _clipcli_script() -> str:
    script = shutil.which("clipcli", path=os.path.dirname(sys.executable))
    assert script, "the clipcli console script is installed beside the interpreter"
    return script


def _completion_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **ENV, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1", "SHELL": "/bin/bash"}
    env.update(extra)
    return env


def test_show_completion_bash_prints_a_working_script() -> None:
    shown = subprocess.run([_clipcli_script(), "--show-completion", "bash"], capture_output=True, text=True,
                           env=_completion_env(), timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "complete -o default -F _clipcli_completion clipcli" in shown.stdout
    assert "_CLIPCLI_COMPLETE=complete_bash" in shown.stdout
    assert "Traceback" not in shown.stderr
    # What the script asks the program when Tab is pressed, answered by the program.
    for words, cword, expected in (("clipcli embed-", "1", {"embed-image", "embed-text"}),
                                   ("clipcli embed-image --norm", "2", {"--normalize"}),
                                   ("clipcli serve st", "2", {"status", "stop"})):
        answer = subprocess.run([_clipcli_script()], capture_output=True, text=True, timeout=120,
                                env=_completion_env(_CLIPCLI_COMPLETE="complete_bash", COMP_WORDS=words,
                                                    COMP_CWORD=cword))
        assert answer.returncode == 0, answer.stderr
        assert expected <= set(answer.stdout.split()), (words, answer.stdout)


def test_completion_options_are_in_the_top_level_help() -> None:
    text = render_help(())
    assert "--install-completion" in text and "--show-completion" in text
