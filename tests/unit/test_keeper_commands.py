"""The keeper's commands as a surface: help with examples everywhere, completion, one-line usage errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from rbee.keeper.cli import cli

BIN = Path(sys.executable).parent


def commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))


def test_every_command_and_group_has_help_with_examples() -> None:
    runner = CliRunner()
    found = list(commands(cli))
    assert ("hive", "start") in found and ("model", "download") in found and ("completion",) in found
    for args in [(), *found]:
        result = runner.invoke(cli, [*args, "--help"], prog_name="rbee")
        assert result.exit_code == 0, args
        assert "Example" in result.output, args
        assert result.output.startswith(f"Usage: {' '.join(('rbee', *args))} ")


def test_commands_are_listed_most_used_first() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    listed = [line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line.strip()]
    assert listed[0] == "infer"
    assert listed.index("hive") < listed.index("completion")


def rbee(*args: str, env: dict[str, str] | None = None, tmp: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("_RBEE")}
    base.update(RBEE_NO_AUTOSTART="1", RBEE_HOME=str(tmp), RBEE_CONFIG=str(tmp / "none.toml"))
    return subprocess.run(
        [str(BIN / "rbee"), *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        stdin=subprocess.DEVNULL,
        timeout=30,
    )


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_prints_the_shell_script(shell: str) -> None:
    result = CliRunner().invoke(cli, ["completion", shell])
    assert result.exit_code == 0
    assert "_RBEE_COMPLETE" in result.stdout


def test_completion_completes_commands_and_options(tmp_path: Path) -> None:
    words = rbee(env={"_RBEE_COMPLETE": "bash_complete", "COMP_WORDS": "rbee mo", "COMP_CWORD": "1"}, tmp=tmp_path)
    assert words.returncode == 0 and "plain,model" in words.stdout.splitlines()
    options = rbee(
        env={"_RBEE_COMPLETE": "bash_complete", "COMP_WORDS": "rbee model download --a", "COMP_CWORD": "3"},
        tmp=tmp_path,
    )
    assert "plain,--alias" in options.stdout.splitlines()
    shells = rbee(env={"_RBEE_COMPLETE": "bash_complete", "COMP_WORDS": "rbee completion ", "COMP_CWORD": "2"},
                  tmp=tmp_path)  # fmt: skip
    assert {"plain,bash", "plain,zsh", "plain,fish"} <= set(shells.stdout.splitlines())


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("infer", "--temperature", "abc", "hi"), "Invalid value for '--temperature'"),
        (("infr", "hi"), "No such command 'infr'"),
        (("model", "download"), "Missing argument 'SOURCE'"),
        (("model", "download", "x.gguf", "--sha256", "12"), "must be 64 hexadecimal characters"),
        (("model", "download", "relative/x.gguf"), "no file 'relative/x.gguf' here"),
        (("completion", "tcsh"), "Invalid value for '{bash|zsh|fish}'"),
        (("--queen-url", "ftp://x", "status"), "is not an http(s) URL"),
        (("infer",), "the prompt is empty"),
    ],
)
def test_a_usage_error_is_one_line_that_says_where_to_look_and_exits_2(
    tmp_path: Path, args: tuple[str, ...], says: str
) -> None:
    result = rbee(*args, tmp=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("rbee: ") and says in line, line
    assert result.stdout == ""


def test_an_unreachable_queen_says_which_url_and_what_to_do(tmp_path: Path) -> None:
    result = rbee("model", "list", env={"RBEE_QUEEN_URL": "http://127.0.0.1:1"}, tmp=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "rbee: cannot reach the queen at http://127.0.0.1:1: connection refused (start it with `rbee queen start`)"
    ]


@pytest.mark.parametrize("args", [(), ("jobs",), ("model",)])
def test_a_bare_command_prints_its_help_and_exits_0(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = rbee(*args, tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: {' '.join(('rbee', *args))} ")
    assert "Commands:" in result.stdout and len(result.stdout.splitlines()) > 5
    assert result.stderr == ""


def test_every_command_that_talks_to_the_queen_takes_token_queen_url_and_verbose_after_its_name() -> None:
    for path in commands(cli):
        command: click.Command = cli
        for name in path:
            assert isinstance(command, click.Group)
            command = command.commands[name]
        if isinstance(command, click.Group) or not any(p.name == "json_flag" for p in command.params):
            continue
        opts = {opt for p in command.params for opt in p.opts}
        assert {"--token", "--queen-url", "-v", "--verbose"} <= opts, path


def test_hive_start_takes_token_after_the_command(tmp_path: Path) -> None:
    # Without a token a public bind is refused, naming --token; with it, the refusal is about the token's length.
    refused = rbee("hive", "start", "--host", "0.0.0.0", tmp=tmp_path)
    assert refused.returncode == 2 and "--token" in refused.stderr
    short = rbee("hive", "start", "--host", "0.0.0.0", "--token", "short", tmp=tmp_path)
    assert short.returncode == 2, short.stderr
    assert "No such option" not in short.stderr and "16 characters" in short.stderr
