"""--set KEY=VALUE for the bench scripts: a key of this project's config, its value read as YAML."""
import difflib

import yaml


def _leaf_keys(node, prefix=""):
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _leaf_keys(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def parse_override(item, error):
    """(KEY, value) of a --set KEY=VALUE; error(message) unless KEY is a key of this project's config."""
    from biapy.config.defaults import get_defaults  # yacs only, no torch

    key, sep, text = item.partition("=")
    if not sep or not key:
        error(f"--set: expected KEY=VALUE, got {item!r}")
    node = get_defaults()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            close = difflib.get_close_matches(key, list(_leaf_keys(get_defaults())), n=1)
            error(f"--set: unknown key {key!r}" + (f"; did you mean {close[0]}?" if close else ""))
        node = node[part]
    if isinstance(node, dict):
        error(f"--set: {key} is a section; name a key inside it")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        error(f"--set {key}: {text!r} is not valid YAML ({str(e).splitlines()[0]})")
    if value is None:
        error(f"--set {key}: a value is needed after '='")
    from biapy.config.load import merge_values
    from biapy.errors import ConfigError

    try:  # the type the config expects (a YAML 'yes' is True; a word where a number goes is refused here)
        merge_values(get_defaults(), {key: value}, "--set")
    except ConfigError as err:
        error(str(err))
    return key, value
