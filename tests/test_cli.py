"""The command line as a whole: no abbreviated options, and no secret is ever printed back."""

from __future__ import annotations

import argparse

import pytest

from alphadrive_ray.cli import build_parser, main

SECRET = "sk-proj-TEST0123456789abcdef"


def all_parsers(parser: argparse.ArgumentParser | None = None, path: tuple[str, ...] = ()):
    """(command path, parser) for the top-level parser and every sub-command, depth first."""
    parser = parser or build_parser()
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, (*path, name))


def key_options():
    """(command path, parser, option) for every option whose name mentions a key."""
    return [
        (path, parser, option)
        for path, parser in all_parsers()
        for action in parser._actions
        for option in action.option_strings
        if "key" in option.lower()
    ]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A real one-scene dataset, so that commands get past reading their input."""
    from alphadrive_ray.data.synth import generate_dataset

    path, _ = generate_dataset(tmp_path_factory.mktemp("cli-scenes"), 1, seed=0, size=64)
    return path


def argv_for(path, parser, tmp_path, dataset) -> list[str]:
    """The command with values for its positionals (the dataset as input) and required options."""
    argv = list(path)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.default == argparse.SUPPRESS:
            continue
        if not action.option_strings:
            argv.append(str(dataset) if action.dest == "input" else str(tmp_path / f"{action.dest}.jsonl"))
        elif action.required:
            argv += [action.option_strings[-1], "x"]
    return argv


def run(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out + out.err


def test_every_parser_refuses_abbreviated_options():
    parsers = list(all_parsers())
    assert len(parsers) > 10
    for path, parser in parsers:
        assert parser.allow_abbrev is False, " ".join(path) or "alphadrive-ray"


def test_there_are_key_options_to_check():
    assert {"--api-key", "--api-key-env"} <= {option for _, _, option in key_options()}


@pytest.mark.parametrize("path, parser, option", key_options(), ids=[" ".join((*p, o)) for p, _, o in key_options()])
def test_no_command_prints_a_value_given_to_a_key_option(path, parser, option, tmp_path, capsys, dataset, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # the commands get as far as looking for a key
    base = argv_for(path, parser, tmp_path, dataset)
    for argv in (base + [option, SECRET], base + [f"{option}={SECRET}"]):
        code, printed = run(argv, capsys)
        assert code != 0 and SECRET not in printed, printed
        assert "Traceback" not in printed
    # abbreviations of the option are refused, and their values not shown either
    for cut in range(3, len(option)):
        prefix = option[:cut]
        if any(prefix == o for _, p, o in key_options() if p is parser):
            continue
        code, printed = run(base + [prefix, SECRET], capsys)
        assert code == 2 and SECRET not in printed, (prefix, printed)


def test_api_key_is_answered_with_where_keys_come_from(tmp_path, capsys):
    code, printed = run(
        ["distill", "run", "in.jsonl", str(tmp_path / "out.jsonl"), "--model", "m", "--api-key", SECRET],
        capsys,
    )
    assert code == 2
    assert "--api-key is not accepted: API keys are read from the environment only" in printed
    assert "OPENAI_API_KEY" in printed and "--api-key-env" in printed and SECRET not in printed


def test_api_key_env_given_a_key_says_it_takes_a_name(tmp_path, capsys):
    code, printed = run(
        ["distill", "run", "in.jsonl", str(tmp_path / "out.jsonl"), "--model", "m", "--api-key-env", SECRET],
        capsys,
    )
    assert code == 2
    assert "--api-key-env takes the NAME of an environment variable" in printed and SECRET not in printed


def test_unrecognised_arguments_are_named_without_their_values(capsys):
    code, printed = run(["config-docs", "--token", SECRET, f"--password={SECRET}"], capsys)
    assert code == 2 and "unrecognized arguments: --token --password" in printed and SECRET not in printed
