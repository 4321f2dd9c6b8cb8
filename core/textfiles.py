"""Parsing files people write by hand (network and device YAML, traces, profiles edited after the fact).

PyYAML and the json module both keep the last of two equal keys without a word, so a network file
that says ``uplink_mbps`` twice plans at whichever came last and the user never learns the first was
ignored. Here a repeated key is an error that names the key and both lines.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .files import read_at_most

_MERGE = "tag:yaml.org,2002:merge"


class DuplicateKeyError(ValueError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE:  # `<<: *base` merges, and keys after it override it: YAML's own rule
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            seen = key in first
        except TypeError:  # an unhashable key: construct_mapping refuses it in its own words
            continue
        line = key_node.start_mark.line + 1
        if seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} on lines {first[key]} and {line}", key_node.start_mark
            )
        first[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping and nesting deeper than Python's
    recursion limit (raises ``yaml.YAMLError``: a file of 10,000 ``[`` was a RecursionError traceback)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError("nested too deeply to be a hand-written file") from None


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKeyError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (RFC 8259 has no NaN or infinity)")


def _finite(text: str) -> float:
    v = float(text)
    if v in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:40]} is past the largest number a float holds")
    return v


def load_json(text: str | bytes) -> Any:
    """``json.loads`` that refuses a key given twice in one object (raises ``DuplicateKeyError``), the
    ``NaN``/``Infinity`` tokens Python's json accepts and a number past float range (``1e999``, which it
    reads as infinity), and nesting deeper than Python's recursion limit (``ValueError``): no writer of
    ours emits them, a pushed plan carrying one had it checked into its id and kept, and an infinite
    median in a profile planned without a word."""
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:
        raise ValueError("nested too deeply to be a file of ours") from None


def finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinity (Python's or numpy's) as None: what strict JSON can hold. An
    infinite max error (``fidelity --json`` of a model whose outputs are NaN) printed as the bare token
    ``Infinity``, which JSON has not, and a strict parser in a user's pipeline stopped there."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):  # a key that is a non-finite float becomes its name, as json wrote it
        return {
            (str(k) if isinstance(k, float) and k != k or k in _INF else k): finite(v) for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if type(obj).__module__ == "numpy" and getattr(obj, "shape", None) == ():  # a numpy scalar
        item = obj.item()
        return finite(float(item) if type(item) is type(obj) else item)  # longdouble's item is itself
    return obj  # an array or anything else: the caller's default hook, as before


_INF = (float("inf"), float("-inf"))


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``finite(obj)`` that refuses what JSON cannot hold, rather than writing it."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def read_document(
    path: Path,
    noun: str,
    limit: int,
    parse: Callable[[str], Any],
    error: Callable[[str], Exception],
    shown: str | None = None,
) -> Any:
    """A text file a user names (a profile, a network or device profile, a trace), parsed, with one
    line naming the file for each way it can be wrong: nothing but a regular file is opened (a device
    was read until memory ran out, a pipe waited for ever) and nothing past ``limit`` is read."""
    shown = shown or str(path)
    try:  # a folder on the way that cannot be searched raises here (EACCES), not only in the read
        if not path.is_file():
            what = (
                f"is a directory, not a {noun} file"
                if path.is_dir()
                else "is not a regular file"
                if path.exists()
                else "not found"
            )
            raise error(f"{noun} file {what}: {shown}")
        raw, size = read_at_most(path, limit)
    except OSError as exc:
        raise error(f"cannot read {noun} file {shown}: {exc.strerror}") from exc
    if size > limit:
        raise error(f"{shown}: {size:,} bytes is larger than any {noun} ({limit:,} at most)")
    language = "YAML" if parse is load_yaml else "JSON"
    try:
        return parse(raw.decode("utf-8-sig"))  # a BOM, as Windows editors write, is no content
    except UnicodeDecodeError as exc:
        raise error(f"{shown}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    # ValueError: also a repeated key and JSON's NaN and Infinity, which Python's json would read
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        # the whole reason on one line: its first line alone lost where the mistake is and what it is
        reason = " ".join(str(exc).replace(' in "<unicode string>",', " at").split())[:400]
        raise error(f"{shown}: not valid {language} ({reason})") from exc
