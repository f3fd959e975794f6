"""Run configurations: how a ``declens`` command was invoked, recorded in its results folder.

Every command that writes a results folder writes ``config.json`` there once its result is complete::

    {"schema": 1, "command": "analyze", "params": {"model": "...", "task": "arc_easy", ...},
     "declens": "0.x", "cwd": "/where/it/ran", "run_id": "<its manifest run id>"}

``params`` are the command's parameters after defaults (click's ``ctx.params``), as JSON (paths as
strings). ``declens rerun DIR`` replays it and ``declens --config FILE <command>`` takes a file of this
layout (or ``{"<command>": {param: value}}``) as the command's defaults. This module reads and writes
the file; it does not import the command line (the CLI passes the names it knows).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import DeclensError
from .results import MANIFEST_FILE, atomic_write_json, to_jsonable

#: the file in a results folder that records how the run was invoked (not listed in ``manifest.json``)
CONFIG_FILE = "config.json"
#: version of the ``config.json`` layout this declens writes and reads
CONFIG_SCHEMA = 1


@dataclass(frozen=True)
class RunConfig:
    """How one ``declens`` command was invoked.

    Attributes:
        command: the command's name (``analyze``, ``prune`` ...).
        params: parameter name (the Python name, e.g. ``fmt`` for ``--format``) -> JSON value, after defaults.
        declens: the declens version that ran it.
        cwd: the working folder it ran in (relative paths in ``params`` are relative to it).
        schema: the layout version of the file.
        run_id: the ``manifest.json`` run id of the result this invocation wrote ("" if unknown): a folder
            whose result was since rewritten by another run holds a ``config.json`` that no longer describes it.
    """

    command: str
    params: dict[str, Any] = field(default_factory=dict)
    declens: str = ""
    cwd: str = ""
    schema: int = CONFIG_SCHEMA
    run_id: str = ""

    def to_dict(self) -> dict:
        return {"schema": self.schema, "command": self.command, "params": self.params, "declens": self.declens,
                "cwd": self.cwd, "run_id": self.run_id}


def _plain(value: Any) -> Any:
    """A parameter value as JSON: paths as strings, tuples as lists, enums by value."""
    if isinstance(value, Enum):
        return _plain(value.value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    out = to_jsonable(value)
    return out if out is None or isinstance(out, (str, int, float, bool, list, dict)) else str(out)


def make_run_config(command: str, params: Mapping[str, Any]) -> RunConfig:
    """The :class:`RunConfig` of ``command`` run with ``params`` (made JSON-able), this version and folder."""
    from ._version import __version__

    return RunConfig(command=command, params={str(k): _plain(v) for k, v in params.items()}, declens=__version__,
                     cwd=str(Path.cwd()))


def manifest_run_id(folder: Path | str) -> str | None:
    """The run id in ``folder``'s ``manifest.json`` (None: no folder, no manifest, or not a declens one). A new id
    means a run wrote a complete result there: the CLI records its ``config.json`` only then."""
    try:
        d = json.loads((Path(folder) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    rid = d.get("run_id") if isinstance(d, dict) else None
    return rid if isinstance(rid, str) and rid else None


def save_run_config(folder: Path | str, rc: RunConfig) -> Path:
    """Write ``rc`` to ``folder/config.json`` atomically (temp file + rename); return the path."""
    path = Path(folder) / CONFIG_FILE
    atomic_write_json(path, rc.to_dict())
    return path


def load_run_config(path: Path | str) -> RunConfig:
    """The :class:`RunConfig` recorded in a results folder (or its ``config.json`` itself).

    Raises:
        DeclensError: no such folder, no ``config.json`` (a folder written by a declens before run
            configurations were recorded, or by the Python API), or one this declens cannot read.
    """
    p = Path(path)
    f = p / CONFIG_FILE if p.is_dir() else p
    if not p.exists():
        raise DeclensError(f"run folder {str(p)!r} does not exist")
    if not f.is_file():
        raise DeclensError(f"{str(p)!r} holds no {CONFIG_FILE}, so it cannot be replayed: it was written by a declens "
                           "older than run configurations, or through the Python API; rerun by hand with the "
                           "settings its result JSON records under 'config'")
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DeclensError(f"{str(f)!r} is not valid JSON ({e}); restore it or rerun by hand") from None
    return check_current(run_config_from_dict(d, str(f)), f.parent, str(f))


def check_current(rc: RunConfig, folder: Path | str, where: str) -> RunConfig:
    """``rc`` if it describes the result now in ``folder`` (or that cannot be told: no run id recorded, no
    ``manifest.json`` beside it, as for a copied file).

    Raises:
        DeclensError: the folder's result was written by another run since (through the Python API, which
            records no invocation), so replaying ``rc`` would not reproduce it.
    """
    current = manifest_run_id(folder)
    if rc.run_id and current is not None and current != rc.run_id:
        raise DeclensError(f"{where} describes run {rc.run_id}, but {str(folder)!r} now holds run {current}, written "
                           "without recording its invocation (e.g. through the Python API); it cannot be replayed: "
                           "rerun by hand with the settings its result JSON records under 'config'")
    return rc


def run_config_from_dict(d: Any, where: str) -> RunConfig:
    """A :class:`RunConfig` from the JSON of a ``config.json`` (``where`` names it in messages).

    Raises:
        DeclensError: not a run configuration, or one of a newer layout than this declens reads.
    """
    if not (isinstance(d, dict) and isinstance(d.get("command"), str) and isinstance(d.get("params"), dict)):
        raise DeclensError(f"{where} is not a declens run configuration (it needs 'command' and 'params')")
    schema = d.get("schema", CONFIG_SCHEMA)
    if not isinstance(schema, int) or isinstance(schema, bool) or schema > CONFIG_SCHEMA:
        raise DeclensError(f"{where} has run-configuration schema {schema!r}, but this declens reads schema "
                           f"{CONFIG_SCHEMA}; upgrade declens to replay it")
    return RunConfig(command=d["command"], params=dict(d["params"]), declens=str(d.get("declens", "")),
                     cwd=str(d.get("cwd", "")), schema=schema, run_id=str(d.get("run_id") or ""))


def is_run_config(d: Any) -> bool:
    """``d`` has the ``config.json`` layout (``command`` and ``params``), not the ``{command: params}`` one."""
    return isinstance(d, dict) and "command" in d and "params" in d


def defaults_from_file(path: Path | str, command: str, names: Mapping[str, str]) -> dict[str, Any]:
    """The defaults a ``--config FILE`` gives ``command``: ``{param name: value}``.

    The file holds a run configuration (``config.json``: it applies to its command only, and its ``out`` is
    left out so that a replay never writes into the recorded run's folder by accident) or a mapping
    ``{"<command>": {param: value}}`` (the invoked command's entry).

    Args:
        path: the file (or a results folder: its ``config.json``).
        command: the command being invoked.
        names: every name a parameter of ``command`` may be given by -> its parameter name (``fmt``,
            ``format`` -> ``fmt``).

    Raises:
        DeclensError: the file is missing or not JSON, holds a run configuration of another command or
            no entry for ``command``, or names parameters ``command`` does not have (one line listing them and the valid names).
    """
    p = Path(path)
    p = p / CONFIG_FILE if p.is_dir() else p  # a results folder: its config.json
    if not p.is_file():
        raise DeclensError(f"--config {str(p)!r} is not a file; give a config.json of a results folder or a JSON "
                           'file like {"analyze": {"task": "arc_easy"}}')
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DeclensError(f"--config {str(p)!r} is not valid JSON ({e})") from None
    if is_run_config(d):
        rc = check_current(run_config_from_dict(d, f"--config {str(p)!r}"), p.parent, f"--config {str(p)!r}")
        if rc.command != command:
            raise DeclensError(f"--config {str(p)!r} records a 'declens {rc.command}' run, not '{command}'; invoke "
                               f"'declens --config {p} {rc.command}', or 'declens rerun' its folder")
        given = {k: v for k, v in rc.params.items() if k != "out"}
    elif isinstance(d, dict) and d and all(isinstance(v, dict) for v in d.values()):
        if command not in d:
            raise DeclensError(f"--config {str(p)!r} has no entry for 'declens {command}' (it has "
                               f"{', '.join(map(repr, sorted(d)))}); add {{\"{command}\": {{...}}}}")
        given = dict(d[command])
    else:
        raise DeclensError(f"--config {str(p)!r} is neither a config.json of a results folder nor a mapping "
                           '{"<command>": {parameter: value}}')
    unknown = sorted(k for k in given if k not in names)
    if unknown:
        valid = sorted(set(names.values()))
        raise DeclensError(f"--config {str(p)!r}: 'declens {command}' has no parameter {', '.join(map(repr, unknown))}; "
                           f"its parameters are {', '.join(valid)} (long option names such as 'format', 'num-fewshot' work too)")
    return {names[k]: v for k, v in given.items()}


__all__ = ["CONFIG_FILE", "CONFIG_SCHEMA", "RunConfig", "check_current", "defaults_from_file", "is_run_config", "load_run_config",
           "make_run_config", "manifest_run_id", "run_config_from_dict", "save_run_config"]
