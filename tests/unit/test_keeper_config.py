"""The keeper's settings: the config file, environment overrides, flags, and `rbee config`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from rbee.config import ConfigError, load_config
from rbee.keeper.cli import cli
from rbee.keeper.session import Session

FULL = """
queen_url = "http://queen-box:7833/"
token = "file-token-0123456789"
default_model = "qwen"

[sampling]
max_tokens = 64
temperature = 0.2
top_p = 0.9
top_k = 20
seed = 7
stop = "###"
"""


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config.toml"
    monkeypatch.setenv("RBEE_CONFIG", str(path))
    monkeypatch.delenv("RBEE_QUEEN_URL", raising=False)
    monkeypatch.delenv("RBEE_TOKEN", raising=False)
    return path


def test_a_missing_file_is_an_empty_config(config: Path) -> None:
    loaded = load_config()
    assert (loaded.queen_url, loaded.token, loaded.default_model, loaded.sampling) == (None, None, None, None)


def test_every_key_is_read(config: Path) -> None:
    config.write_text(FULL)
    loaded = load_config()
    assert loaded.queen_url == "http://queen-box:7833/"
    assert loaded.token == "file-token-0123456789"
    assert loaded.default_model == "qwen"
    assert loaded.sampling == {"max_tokens": 64, "temperature": 0.2, "top_p": 0.9, "top_k": 20, "seed": 7,
                               "stop": ["###"]}  # fmt: skip


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('queen = "http://x"', "unknown key 'queen'; the keys are queen_url, token, default_model and [sampling]"),
        ("queen_url = 7833", "queen_url must be a non-empty string"),
        ("[sampling]\ntemprature = 0.5", "unknown key 'temprature' in [sampling]"),
        ('[sampling]\ntemperature = "hot"', "[sampling] temperature must be a number (got 'hot')"),
        ("[sampling]\nmax_tokens = 1.5", "[sampling] max_tokens must be an integer"),
        ("[sampling]\nstop = [1, 2]", "[sampling] stop must be a string or a list of strings"),
        ("sampling = 3", "sampling must be a table"),
        ("queen_url = ", "is not valid TOML"),
    ],
)
def test_a_bad_file_is_refused_with_the_file_and_the_key(config: Path, text: str, says: str) -> None:
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config()
    assert str(config) in str(info.value) and says in str(info.value)


def test_the_environment_overrides_the_file_and_flags_override_both(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config.write_text(FULL)
    plain = Session()
    assert (plain.url, plain.token) == ("http://queen-box:7833", "file-token-0123456789")
    monkeypatch.setenv("RBEE_QUEEN_URL", "http://env-box:7833")
    monkeypatch.setenv("RBEE_TOKEN", "env-token-0123456789")
    from_env = Session()
    assert (from_env.url, from_env.token) == ("http://env-box:7833", "env-token-0123456789")
    flagged = Session(queen_url="http://flag-box:1", token="flag-token-0123456789")
    assert (flagged.url, flagged.token) == ("http://flag-box:1", "flag-token-0123456789")


def test_rbee_config_shows_each_setting_and_where_it_comes_from(config: Path) -> None:
    config.write_text(FULL)
    runner = CliRunner()
    shown = runner.invoke(cli, ["config"], env={"RBEE_QUEEN_URL": "http://env-box:7833", "RBEE_TOKEN": None})
    assert shown.exit_code == 0, shown.output
    for part in ("http://env-box:7833 (RBEE_QUEEN_URL)", "set (config file)", "qwen (config file)", "temperature=0.2"):
        assert part in shown.stdout, part
    assert "file-token" not in shown.stdout  # never the token itself
    as_json = json.loads(runner.invoke(cli, ["--queen-url", "http://flag:9", "config", "--json"]).stdout)
    assert as_json["queen_url"] == "http://flag:9" and as_json["queen_url_from"] == "--queen-url"
    assert as_json["token_from"] == "config file" and as_json["sampling"]["max_tokens"] == 64


def test_a_broken_config_is_one_line_and_exit_2(config: Path) -> None:
    config.write_text("[sampling]\ntemperature = 'hot'\n")
    result = CliRunner().invoke(cli, ["status"], env={"RBEE_NO_AUTOSTART": "1"})
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"rbee: {config}: [sampling] temperature must be a number")
    assert line.endswith("fix the file, or point RBEE_CONFIG elsewhere")
