"""README's commands are real: every `python eval.py`, `python training.py` and `python -m
models.convert` line of its code blocks parses with the real parsers (sub-command, flags, their
choices, the positionals), and the examples at the top of `--help` are README's own lines."""
from __future__ import annotations

import argparse
import copy
import os
import re
import shlex

import pytest

from tests.helpers import ROOT
from utils import cli

ENTRY = {"eval.py": "eval", "training.py": "training", "-m models.convert": "models.convert"}
PATH_TYPES = {cli.existing_dir, cli.existing_file, cli.existing_path, cli.weights_path,
              cli.output_dir, cli.new_file}


def code_block_commands(text: str) -> list[str]:
    """The python command lines of a markdown text's fenced code blocks, comments removed."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if inside and line.startswith("python "):
            lines.append(line.split("  #")[0].strip())
    return lines


def readme_commands() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return code_block_commands(f.read())


def parser_of(module: str) -> argparse.ArgumentParser:
    """The module's real parser, with path checks off (README's paths do not exist here)."""
    import importlib
    parser = copy.deepcopy(importlib.import_module(module).build_parser())
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if action.type in PATH_TYPES:
                action.type = None
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
    return parser


def split(command: str) -> tuple[str, list[str]]:
    words = shlex.split(command)[1:]
    if words[:2] == ["-m", "models.convert"]:
        return "models.convert", words[2:]
    return ENTRY[words[0]], words[1:]


def test_readme_shows_the_commands_of_every_entry_point():
    modules = {split(c)[0] for c in readme_commands()}
    assert modules == {"eval", "training", "models.convert"}
    subcommands = {split(c)[1][0] for c in readme_commands() if split(c)[0] == "eval"}
    assert {"figures", "tofolder", "interpolate", "speed", "info", "fid", "export"} <= subcommands


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_parses(command, capsys):
    module, argv = split(command)
    try:
        parser_of(module).parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{command!r} does not parse: {capsys.readouterr().err.strip()} ({e.code})")


def test_a_wrong_flag_would_be_caught(capsys):
    with pytest.raises(SystemExit):
        parser_of("eval").parse_args(["figures", "./f", "cifar10", "--n_imagez", "4"])
    with pytest.raises(SystemExit):
        parser_of("eval").parse_args(["export", "./e", "cifar10", "--format", "onnx"])


@pytest.mark.parametrize("module", ["eval", "training"])
def test_help_examples_are_readmes(module):
    import importlib
    doc = importlib.import_module(module).__doc__
    examples = [re.sub(r"\s+", " ", line.split("  #")[0].strip())
                for line in doc.splitlines() if line.strip().startswith("python ")]
    readme = {re.sub(r"\s+", " ", c) for c in readme_commands()}
    assert examples and [e for e in examples if e not in readme] == []


@pytest.mark.parametrize("module", ["eval", "training", "models.convert"])
def test_every_flag_is_in_a_named_group(module):
    parsers = [parser_of(module)]
    for p in list(parsers):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    for p in parsers:
        generic = [a.option_strings for g in p._action_groups if g.title == "options"
                   for a in g._group_actions if a.option_strings != ["-h", "--help"]]
        assert generic == [], f"{p.prog}: flags outside a named group: {generic}"


def test_ci_runs_readmes_test_command():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    quick = text[text.index("## Quick start"):]
    block = quick[quick.index("```bash") + len("```bash"):quick.index("```", quick.index("```bash") + 3)]
    install_run, install_test = [line.strip() for line in block.strip().splitlines()]
    assert "pip install -r requirements.txt" in install_run and "eval.py figures" in install_run
    assert "pip install -r requirements-dev.txt" in install_test and "pytest" in install_test
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert install_test in f.read().splitlines()
