"""One name per idea: an option shared by two commands has the same name and meaning in both, every
option is a field of its command's config dataclass (so help defaults are that dataclass's), no two
names mean the same thing, --help shows no `<bool>`, and README's option reference is current."""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from pathlib import Path

import pytest
import typer

from ee_cli.base import config
from ee_cli.commands import options
from ee_cli.cli import app

COMMANDS = typer.main.get_command(app).commands
DEFAULT = re.compile(r" \(default [^()]*\)")
CONFIG_FIELDS_WITHOUT_OPTION = {"cache", "class_prior"}  # set by --no-cache, --no-class-prior


def _options(command) -> dict[str, object]:
    return {param.name: param for param in command.params if getattr(param, "param_type_name", "") == "option" and param.name != "help"}


def test_an_option_shared_by_two_commands_has_one_name_and_one_meaning():
    meanings = defaultdict(dict)
    for command_name, command in COMMANDS.items():
        for name, param in _options(command).items():
            meanings[name][command_name] = (tuple(param.opts), DEFAULT.sub("", param.help or ""))
    shared = {name: used for name, used in meanings.items() if len(used) > 1}
    assert {"data", "bundle", "out", "threads", "timed_runs", "max_drop", "quiet", "seed", "export"} <= set(shared)
    for name, used in shared.items():
        assert len(set(used.values())) == 1, (name, used)


def test_no_two_option_names_mean_the_same_thing():
    by_meaning = defaultdict(list)
    for name, text in options.HELP.items():
        by_meaning[text].append(name)
    assert [names for names in by_meaning.values() if len(names) > 1] == []


@pytest.mark.parametrize("command_name, class_name", options.COMMAND_CONFIGS.items())
def test_every_option_is_its_configs_field_and_shows_its_default(command_name, class_name):
    fields = {field.name: field for field in dataclasses.fields(getattr(config, class_name))}
    found = _options(COMMANDS[command_name])
    cli_only = {name for name, where in options.CLI_ONLY.items() if where in (command_name, "*")}
    assert set(found) - cli_only == set(fields) - CONFIG_FIELDS_WITHOUT_OPTION
    for name, param in found.items():
        default = fields[name].default if name in fields else None
        if isinstance(default, (int, float, str)) and not isinstance(default, bool):
            assert f"(default {default})" in param.help, (name, param.help)


@pytest.mark.parametrize("command", [[], *[[name] for name in options.COMMAND_CONFIGS]])
def test_help_shows_no_bool_and_paths_as_path(cli, command):
    result = cli(*command, "--help")
    assert result.exit_code == 0
    assert "<bool>" not in result.stdout
    if command and command[0] in ("personalise", "evaluate", "run"):
        assert re.search(r"--data\s+<path>", result.stdout), result.stdout


def test_readme_option_reference_is_generated_from_the_configs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert options.reference_table() in readme, "README's option reference is stale: python scripts/options_reference.py --write"
