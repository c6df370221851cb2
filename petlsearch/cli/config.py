"""`search --config FILE`: a YAML file of a command's flags under their names, read in front of the
flags given with it; and the run's own options written back as run.yaml, from which it repeats."""

from __future__ import annotations

import argparse
from typing import Any

from petlsearch.errors import PetlsearchError

NOT_IN_CONFIG = ("config", "resume", "help")  # a config says what to run, not whether to continue it


def config_actions(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in sub._actions if a.option_strings and a.dest not in NOT_IN_CONFIG}


def config_tokens(path: str, sub: argparse.ArgumentParser) -> list[str]:
    """The flags a --config YAML file stands for (keys: the flags' names, with - or _)."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise PetlsearchError(f"cannot read the config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise PetlsearchError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PetlsearchError(f"{path}: a config file is a mapping of option names to values")
    actions = config_actions(sub)
    tokens: list[str] = []
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None:
            from petlsearch.errors import did_you_mean

            names = [d.replace("_", "-") for d in actions]
            raise PetlsearchError(f"{path}: unknown option '{key}'{did_you_mean(str(key).replace('_', '-'), names)}; "
                                  f"valid: {', '.join(names)}")
        tokens += _flag_tokens(path, key, value, action)
    return tokens


def _flag_tokens(path: str, key: str, value: Any, action: argparse.Action) -> list[str]:
    flag = action.option_strings[-1]
    if value is None:
        return []
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise PetlsearchError(f"{path}: option '{key}' is a switch: true or false, got {value!r}")
        return [flag] if value else []
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        if isinstance(value, dict):  # option: {objectives: [score, params]}
            items = [f"{k}={_yaml_scalar(v)}" for k, v in value.items()]
        return [t for item in items for t in (flag, str(item))]
    if isinstance(value, list):  # plugins: [lora, bitfit]
        return [flag, ",".join(str(v) for v in value)]
    if isinstance(value, dict):
        raise PetlsearchError(f"{path}: option '{key}' takes one value, got a mapping")
    return [flag, str(value)]


def _yaml_scalar(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """Every search option of this run under the flags' names: written to the run folder as run.yaml,
    from which `petlsearch search --config` repeats the run."""
    actions = config_actions(args.search_parser)
    return {dest.replace("_", "-"): getattr(args, dest) for dest in actions}
