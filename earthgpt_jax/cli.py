"""What the command-line entry points share: a user's mistake is one `error:` line on stderr and
a nonzero exit, said before anything slow starts, never a traceback.

Imports nothing heavy (no JAX): `main.py` checks its flags with it before importing the rest.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import re
import sys

from absl import flags
from ml_collections import config_dict
from ml_collections.config_flags import config_flags


class UsageError(Exception):
    """A mistake in how a command was called (a missing checkpoint, an option value that cannot
    work): the entry points print its message as one `error:` line and exit 2."""


def fail(message: str, code: int = 2):
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def quiet_library_logs() -> None:
    """Our progress at INFO on the root logger; absl's (orbax, TFDS) kept to warnings so those
    lines stay readable."""
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)


# ----------------------------------------------------------------------------- config flags

def _flag_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        match = re.fullmatch(rf"--?{re.escape(name)}(?:=(.*))?", arg)
        if match:
            if match.group(1) is not None:
                return match.group(1)
            return argv[i + 1] if i + 1 < len(argv) else None
    return None


def _load_config(name: str, value: str):
    """(config, None) or (None, why it cannot be loaded): the config file's get_config(arg)."""
    path, colon, arg = value.partition(":")
    if not os.path.isfile(path):
        return None, f"--{name}={value}: config file {path} not found"
    spec = importlib.util.spec_from_file_location(f"_{name}_config_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return (module.get_config(arg) if colon else module.get_config()), None
    except (ValueError, TypeError, KeyError) as e:  # e.g. an unknown preset
        return None, f"--{name}={value}: {e}"


def _keys(config, prefix: str = "") -> list[str]:
    out = []
    for key, value in config.items():
        out.append(prefix + key)
        if isinstance(value, config_dict.ConfigDict):
            out += _keys(value, f"{prefix}{key}.")
    return out


def _unknown_key(config, key: str) -> bool:
    node = config
    for part in key.split("."):
        if "[" in part or not isinstance(node, config_dict.ConfigDict):
            return False  # indexing into a tuple or a value: left to ml_collections
        if part not in node:
            return True
        node = node[part]
    return False


def config_flag_error(argv: list[str], name: str) -> str | None:
    """Why the config flag `name` in argv cannot work (its file, its argument, an override key
    the config lacks, with the closest key it has), or None."""
    value = _flag_value(argv, name)
    if value is None:
        return None
    config, why = _load_config(name, value)
    if why:
        return why
    for arg in argv:
        match = re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
        if match and _unknown_key(config, match.group(1)):
            key = match.group(1)
            close = difflib.get_close_matches(key, _keys(config), n=1, cutoff=0.6)
            hint = (f"did you mean --{name}.{close[0]}?" if close else
                    f"its top-level keys: {', '.join(config.keys())}")
            return f"--{name}.{key}: {value} has no key {key}; {hint}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's `flags_parser` for `app.run`: a bad config file, argument or override key, or any
    other flag error, is one line and exit 1 (absl's status for flag errors) before main()
    runs, where ml_collections would print a traceback for most of them."""
    fv = flags.FLAGS
    for name in list(fv):
        if isinstance(fv[name].parser, config_flags.ConfigFileFlagParser):
            why = config_flag_error(argv, name)
            if why:
                fail(why, code=1)
    try:
        return fv(argv)
    except flags.Error as e:
        fail(f"{e} (--helpshort lists the flags)", code=1)
