"""Result files: atomic writes, provenance, and the layer-wise analysis result.

Every result file records the config that produced it, the library versions, and the model and
data fingerprints. Files are written to a temporary name and renamed into place, so a killed run
never leaves a half-written file.

A run folder is written as a whole by :class:`RunWriter`: the old ``manifest.json`` is removed
before the first write and the new one (every file's path, size and sha256) is written last, so a
folder is either complete and consistent or has no manifest. Every reader calls
:func:`verify_run_folder` first and reads only the files the manifest lists.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import distributed
from .formats import score_kind
from .metrics import LayerMetrics, compute_metrics, margins, predictions
from .scoring import LayerScores, ScoreState

RESULT_FILE = "result.json"
LAYERS_CSV = "layers.csv"
SCORES_FILE = "scores.npz"


def _atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give results the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write bytes to ``path`` atomically (temp file + rename)."""
    _atomic(Path(path), data)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write text to ``path`` atomically (temp file + rename)."""
    _atomic(Path(path), text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False) + "\n")


def atomic_save_npz(path: Path | str, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    _atomic(Path(path), buf.getvalue())


def to_jsonable(obj: Any) -> Any:
    """Convert numpy values (and NaN) to plain JSON values."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return None if f != f or f in (float("inf"), float("-inf")) else f  # exact: JSON round-trips floats
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def config_key(*parts: Any) -> str:
    """A short hash of JSON-serialisable parts (for checkpoint names)."""
    return hashlib.sha256(json.dumps(to_jsonable(list(parts)), sort_keys=True).encode()).hexdigest()[:16]


def versions() -> dict:
    """Versions of the libraries that shape the numbers."""
    import torch
    import transformers

    from ._version import __version__

    return {
        "declens": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def provenance(lm=None, data=None, **extra: Any) -> dict:
    """Versions, fingerprints of the model and data, device, execution options and time."""
    out: dict[str, Any] = {"versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if lm is not None:
        out["model"] = {"spec": lm.spec, "source": lm.source, "family": lm.family, "num_layers": lm.num_layers,
                        "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device),
                        "fingerprint": lm.fingerprint()}
        # prompts longer than the context window: refused unless allowed, and then counted here
        out["truncation"] = {"allowed": bool(getattr(lm, "truncate", False)),
                             "prompts_truncated": int(getattr(lm, "truncated", 0))}
        # how the model was run (fast path, batch planner, fused kernels): they change the rounding
        options = getattr(lm, "options", None)
        if options is not None:
            out["execution"] = options.to_dict()
        out["ranks"] = distributed.world()  # torchrun processes that computed it (1: one process)
    if data is not None:
        out["data"] = {"task": data.name, "split": data.split, "selection": data.selection,
                       "fingerprint": data.fingerprint()}
    out.update(extra)
    return out


class Checkpoint:
    """Partial scoring results on disk, keyed by everything that determines them.

    A killed run restarted with the same config finds its checkpoint and continues; a
    checkpoint written for another config is ignored.
    """

    def __init__(self, directory: Path | str, key: str, name: str = "scores"):
        self.path = Path(directory) / ".checkpoint" / f"{name}-{key}.npz"
        self.key = key

    def load(self) -> ScoreState | None:
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path) as z:
                if str(z["key"]) != self.key:
                    return None
                arrays = {k[2:]: z[k] for k in z.files if k.startswith("a_")}
                return ScoreState(arrays, z["done"].astype(bool))
        except Exception:
            return None  # a corrupt checkpoint is recomputed, never trusted

    def save(self, state: ScoreState) -> None:
        atomic_save_npz(self.path, key=np.array(self.key), done=state.done,
                        **{f"a_{k}": v for k, v in state.arrays.items()})

    def clear(self) -> None:
        if self.path.exists():
            self.path.unlink()
        try:
            self.path.parent.rmdir()
        except OSError:
            pass


def read_result_file(path: str | Path, filename: str, command: str, also: Sequence[str] = ()) -> tuple[Path, dict]:
    """A result folder (or the file itself) written by ``declens <command>``: the file's path and its JSON.

    The folder is checked against its manifest first (:func:`verify_run_folder`), so a folder left
    half-written by a killed run, or with a file of another run, is refused instead of read.

    Args:
        path: the folder, or the result file in it.
        filename: the result file (``result.json``, ``prune.json``, ...).
        command: the command that writes it (for the message).
        also: other files of the folder the caller reads (they must be listed in the manifest).

    Raises:
        DeclensError: the path holds no ``filename``, or the folder is incomplete or was modified.
    """
    from .errors import DeclensError

    p = Path(path)
    p = p / filename if p.is_dir() else p
    if not p.is_file():
        raise DeclensError(f"{str(path)!r} holds no {filename}; pass a folder written by 'declens {command}'")
    manifest = verify_run_folder(p.parent)
    for name in (p.name, *also):
        if name not in manifest.files:
            raise incomplete_error(p.parent, f"its manifest lists no {name}")
    d = json.loads(p.read_text(encoding="utf-8"))
    rk = RESULT_KINDS.get(manifest.kind)
    if rk is not None and p.name == rk.main_file:
        d = upgrade_result(rk, d, p.parent)  # an older schema converted, or refused with the fix
    return p, d


# ------------------------------------------------------------------------------------------------
# Run folders: written as a whole, with a manifest written last and verified on every read

#: written last into every run folder: every file of the result with its size and sha256
MANIFEST_FILE = "manifest.json"
#: while a run folder is being rewritten: the files of the previous run(s), deleted once the new run is written
PREVIOUS_MANIFEST = ".manifest-previous.json"
#: resume state a run keeps in its folder while it works; removed after a successful final write
RESUME_STATE = (".checkpoint", ".prune-state.json")
MANIFEST_VERSION = 1


def incomplete_error(folder: Path | str, why: str):
    """The one error for a run folder that is not a complete, unmodified result."""
    from .errors import DeclensError

    return DeclensError(f"run folder {str(folder)!r} is incomplete or was modified after it was written ({why}); "
                        f"rerun the command that wrote it")


def file_digest(path: Path | str) -> tuple[int, str]:
    """Size in bytes and sha256 (hex) of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


@dataclass
class RunManifest:
    """The manifest of a run folder (``manifest.json``).

    Attributes:
        folder: the run folder.
        kind: the result's kind (``analysis``, ``prune``, ``eval``, ``ablate``, ``cka``, ``noise``,
            ``recover``, ``correlate``).
        run_id: random id of the run that wrote the folder.
        files: relative path -> ``{"size": bytes, "sha256": hex}`` of every file of the result.
        declens: the declens version that wrote it.
        created: when the manifest was written.
        complete: False for an intermediate save of a run that was still working (``recover``).
    """

    folder: Path
    kind: str
    run_id: str
    files: dict[str, dict]
    declens: str = ""
    created: str = ""
    complete: bool = True
    schema_version: int | None = None

    def paths(self, suffixes: Sequence[str] | None = None) -> list[Path]:
        """Paths of the listed files (only those ending in one of ``suffixes``), sorted by name."""
        names = sorted(n for n in self.files if suffixes is None or Path(n).suffix.lower() in suffixes)
        return [self.folder / n for n in names]

    def to_dict(self) -> dict:
        version = {} if self.schema_version is None else {"schema_version": self.schema_version}
        return {"manifest_version": MANIFEST_VERSION, "kind": self.kind, **version, "run_id": self.run_id,
                "declens": self.declens, "created": self.created, "complete": self.complete,
                "files": [{"path": n, **self.files[n]} for n in sorted(self.files)]}


def _read_manifest_file(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("files"), list) else None


def _safe_name(name: Any) -> bool:
    """A plain relative path inside the run folder, not the manifest itself (what a manifest may list)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return False
    return name not in (MANIFEST_FILE, PREVIOUS_MANIFEST)


def verify_run_folder(path: str | Path, allow_partial: bool = False) -> RunManifest:
    """Check a run folder against its manifest: every listed file is there with its size and sha256.

    Every reader of run folders (``report``, ``correlate``, ``recover --from-prune``, the ``load``
    methods) goes through this, and then reads only files the manifest lists.

    Args:
        path: the run folder (or a file in it).
        allow_partial: accept an intermediate save of a run that was still working.

    Returns:
        The verified :class:`RunManifest`.

    Raises:
        DeclensError: the folder does not exist, has no (readable) manifest (a run stopped while
            writing it, or an older declens wrote it), a listed file is missing or differs from
            the one the run wrote, or the result is partial.
    """
    from .errors import DeclensError

    p = Path(path)
    folder = p.parent if p.is_file() else p
    if not folder.is_dir():
        raise DeclensError(f"run folder {str(folder)!r} does not exist")
    mp = folder / MANIFEST_FILE
    if not mp.is_file():
        raise incomplete_error(folder, f"it has no {MANIFEST_FILE}, which declens writes last: the run that wrote it "
                                       "stopped before it finished, or an older declens wrote it")
    d = _read_manifest_file(mp)
    if d is None or not isinstance(d.get("kind"), str):
        raise incomplete_error(folder, f"{MANIFEST_FILE} is not a declens manifest")
    files: dict[str, dict] = {}
    for entry in d["files"]:
        name = entry.get("path") if isinstance(entry, dict) else None
        if not _safe_name(name) or not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
            raise incomplete_error(folder, f"{MANIFEST_FILE} lists a bad entry {str(entry)[:80]!r}")
        q = folder / name
        if not q.is_file():
            raise incomplete_error(folder, f"{name} is missing")
        size, sha = file_digest(q)
        if size != entry["size"]:
            raise incomplete_error(folder, f"{name} has {size} bytes, the run wrote {entry['size']}")
        if sha != entry["sha256"]:
            raise incomplete_error(folder, f"{name} is not the file the run wrote: its sha256 differs")
        files[name] = {"size": size, "sha256": sha}
    m = RunManifest(folder=folder, kind=d["kind"], run_id=str(d.get("run_id", "")), files=files,
                    declens=str(d.get("declens", "")), created=str(d.get("created", "")),
                    complete=d.get("complete", True) is not False,
                    schema_version=d["schema_version"] if isinstance(d.get("schema_version"), int) else None)
    if not m.complete and not allow_partial:
        raise DeclensError(f"run folder {str(folder)!r} holds a partial {m.kind} result (its run was stopped after "
                           f"{len(files)} file(s) of intermediate results); rerun the command that wrote it")
    if p.is_file() and p.name not in files and p.name != MANIFEST_FILE:
        raise incomplete_error(folder, f"its manifest lists no {p.name}")
    return m


def clean_run_folder(folder: Path | str) -> list[Path]:
    """Remove resume state (``.checkpoint/``, ``.prune-state.json``) and stray ``.*.tmp`` files of killed
    atomic writes from a run folder; return what was removed. Called after a successful final write."""
    import shutil

    folder = Path(folder)
    gone = []
    for name in RESUME_STATE:
        q = folder / name
        if q.is_dir():
            shutil.rmtree(q, ignore_errors=True)
            gone.append(q)
        elif q.exists():
            q.unlink()
            gone.append(q)
    for q in folder.glob(".*.tmp"):
        if q.is_file() and re.fullmatch(r"\..+\.[A-Za-z0-9_]+\.tmp", q.name):  # the names _atomic's temp files have
            q.unlink()
            gone.append(q)
    return gone


#: ``kind -> drawer`` look-up of figure drawers, installed by the package (see :func:`set_figure_drawers`)
_figure_drawers: Callable[[str], Callable[..., Any]] | None = None


def set_figure_drawers(lookup: Callable[[str], Callable[..., Any]]) -> None:
    """Install the look-up ``kind -> draw`` of figure drawers. ``declens/__init__.py`` installs
    :data:`declens.plots.FIGURES` and :data:`declens.report.PAGES` (imported on first use), so compute code
    asks for the figures (or page) of its result kind (:meth:`RunWriter.draw_figures`, :func:`figure_drawer`)
    without importing the presentation layer (``tests/test_layering.py``)."""
    global _figure_drawers
    _figure_drawers = lookup


def figure_drawer(kind: str) -> Callable[..., Any]:
    """The figure drawer of a result kind (see :data:`declens.plots.FIGURES` for the signatures)."""
    if _figure_drawers is None:
        raise RuntimeError("no figure drawers are installed; import the declens package, which installs declens.plots")
    return _figure_drawers(kind)


class RunWriter:
    """Writes one result into a run folder as a whole (use as a context manager).

    On entry the folder's manifest is removed first (the list of the previous run's files is kept in
    a hidden ``.manifest-previous.json``), so from then on every reader sees the folder as incomplete.
    Files are written atomically (temp file + rename) and registered; on a clean exit, files of the
    previous run that this run did not write (stale figures, say) are deleted, ``manifest.json`` is
    written last (relative path, size and sha256 of every file, kind, run id, declens version), and
    resume state and stray temp files are removed. An exception leaves the folder without a manifest:
    recognisably incomplete. Under ``torchrun`` only rank 0 writes; on other ranks every call is a no-op.

    Example:
        >>> with RunWriter(out, "analysis") as w:
        ...     w.npz("scores.npz", scores=arr)
        ...     w.json("result.json", d)
        ...     w.draw_figures(res, out)  # the drawer of kind "analysis" (declens.plots.FIGURES)

    Args:
        out_dir: the run folder (created).
        kind: the result's kind.
        partial: an intermediate save of a run still working: readers refuse it (as partial), and
            resume state is kept.

    Raises:
        DeclensError: (on entry) the folder holds a result of another kind.
    """

    def __init__(self, out_dir: Path | str, kind: str, partial: bool = False):
        from . import distributed

        self.folder = Path(out_dir)
        self.kind = kind
        self.partial = partial
        self.active = distributed.is_main()
        self.written: list[str] = []
        self.previous: set[str] = set()

    def __enter__(self) -> "RunWriter":
        if self.active:
            self.previous = begin_run_folder(self.folder, self.kind)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None and self.active:
            finish_run_folder(self, self.folder)
        return False

    def _name(self, name: str) -> Path:
        if name not in self.written:
            self.written.append(name)
        return self.folder / name

    def bytes(self, name: str, data: bytes) -> None:
        """Write a file of the result atomically."""
        if self.active:
            _atomic(self._name(name), data)

    def text(self, name: str, text: str) -> None:
        self.bytes(name, text.encode("utf-8"))

    def json(self, name: str, obj: Any) -> None:
        """Write a JSON file of the result; the main file of a registered kind (:data:`RESULT_KINDS`) gets the
        kind's ``schema_version`` (right after ``kind``)."""
        rk = RESULT_KINDS.get(self.kind)
        if rk is not None and name == rk.main_file and isinstance(obj, dict):
            obj = stamp_schema_version(obj, rk)
        self.text(name, json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False) + "\n")

    def npz(self, name: str, **arrays: np.ndarray) -> None:
        if self.active:
            buf = io.BytesIO()
            np.savez_compressed(buf, **arrays)
            self.bytes(name, buf.getvalue())

    def add(self, paths: Sequence[Path | str]) -> None:
        """Register files written into the folder by other code (figures)."""
        for q in paths:
            q = Path(q)
            if q.resolve().parent != self.folder.resolve():
                raise ValueError(f"{q} is not in the run folder {self.folder}")
            self._name(q.name)

    def figures(self, draw, *args: Any, **kwargs: Any) -> None:
        """Call ``draw(*args, **kwargs)`` (a plot function returning the paths it wrote) and register them;
        nothing is drawn on ranks other than 0."""
        if self.active:
            self.add(draw(*args, **kwargs))

    def draw_figures(self, *args: Any, **kwargs: Any) -> None:
        """Draw the figures of this writer's result kind (its drawer of :data:`declens.plots.FIGURES`, called
        with ``*args, **kwargs``) and register them; nothing is drawn on ranks other than 0."""
        if self.active:
            self.add(figure_drawer(self.kind)(*args, **kwargs))


def check_run_folder_kind(folder: Path | str, kind: str) -> list[dict]:
    """Refuse to write a ``kind`` result into a folder holding (or last rewritten for) another kind of result;
    call it before long work. Returns the manifests found (current and previous).

    Raises:
        DeclensError: the folder's manifest names another kind.
    """
    from .errors import DeclensError

    folder = Path(folder)
    found = [d for d in (_read_manifest_file(folder / MANIFEST_FILE), _read_manifest_file(folder / PREVIOUS_MANIFEST))
             if d is not None]
    other = {d.get("kind") for d in found} - {kind}
    if other:
        raise DeclensError(f"{str(folder)!r} holds the result of another command (kind {sorted(map(str, other))[0]}); "
                           f"write this {kind} result to another folder (--out), or delete that one first")
    return found


def begin_run_folder(folder: Path, kind: str) -> set[str]:
    """Start rewriting a run folder: refuse another kind, keep the previous files' names, remove the manifest.

    Returns:
        Names of the files of the previous run(s) (deleted at the end unless written again).
    """
    folder.mkdir(parents=True, exist_ok=True)
    found = check_run_folder_kind(folder, kind)
    names = {e.get("path") for d in found for e in d["files"] if isinstance(e, dict) and _safe_name(e.get("path"))}
    if found:
        atomic_write_json(folder / PREVIOUS_MANIFEST, {"kind": kind, "files": [{"path": n} for n in sorted(names)]})
    (folder / MANIFEST_FILE).unlink(missing_ok=True)
    return names


def finish_run_folder(w: RunWriter, folder: Path) -> RunManifest:
    """End a rewrite: delete stale files of the previous run, write the manifest last, clean up."""
    import uuid

    from ._version import __version__

    for name in sorted(w.previous - set(w.written)):
        q = folder / name
        if q.is_file():
            q.unlink()
    files = {}
    for name in w.written:
        size, sha = file_digest(folder / name)
        files[name] = {"size": size, "sha256": sha}
    rk = RESULT_KINDS.get(w.kind)
    m = RunManifest(folder=folder, kind=w.kind, run_id=uuid.uuid4().hex, files=files, declens=__version__,
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), complete=not w.partial,
                    schema_version=None if rk is None else rk.schema_version)
    atomic_write_json(folder / MANIFEST_FILE, m.to_dict())
    (folder / PREVIOUS_MANIFEST).unlink(missing_ok=True)
    if not w.partial:
        clean_run_folder(folder)
    return m


# ------------------------------------------------------------------------------------------------
# The result contract: registered kinds with schema versions, one loader, one run discovery

#: the schema every kind had before schema versions were recorded (a main JSON without ``schema_version``)
FIRST_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ResultKind:
    """A registered kind of result (see :func:`register_result`).

    Attributes:
        kind: the name the manifest and the main JSON record (``analysis``, ``prune`` ...).
        schema_version: the version of the main JSON this declens writes and reads.
        main_file: the result's main JSON in its run folder (``result.json``, ``prune.json`` ...).
        command: the ``declens`` command that writes it (for messages: "rerun 'declens <command>'").
        load: ``folder -> typed result`` (the class's ``load``).
        converters: ``version -> convert(main JSON dict) -> dict of version + 1``, for older folders a
            small rename suffices for; an older version without a converter is refused with the fix.
    """

    kind: str
    schema_version: int
    main_file: str
    command: str
    load: Callable[[Path], Any]
    converters: dict[int, Callable[[dict], dict]] = field(default_factory=dict)


#: every registered kind of result, by name (filled by :func:`register_result` as the result modules load)
RESULT_KINDS: dict[str, ResultKind] = {}
#: imports every module that registers a result kind; installed by ``declens/__init__.py`` (see
#: :func:`set_result_importer`), so this module never imports the analyses above it
_import_result_kinds: Callable[[], None] | None = None


def set_result_importer(importer: Callable[[], None]) -> None:
    """Install the function that imports every module registering a result kind (``declens/__init__.py``
    installs it; :func:`result_kind` calls it once for a kind not registered yet)."""
    global _import_result_kinds
    _import_result_kinds = importer


def register_result(kind: str, main_file: str, command: str,
                    converters: dict[int, Callable[[dict], dict]] | None = None,
                    load: str | Callable[[Path], Any] = "load"):
    """Class decorator: register a result class as ``kind``, with its class attribute ``SCHEMA_VERSION``.

    Sets ``cls.KIND``; :class:`RunWriter` then stamps ``schema_version`` into the manifest and the main JSON
    of every ``kind`` folder, and :func:`load_result` returns ``cls.<load>(folder)`` for it.

    Args:
        kind: the kind's name (what the manifest records).
        main_file: its main JSON; command: the command that writes it.
        converters: see :class:`ResultKind`.
        load: name of the class's ``folder -> result`` method (``load``), or a plain function to register
            for a result that has no class of its own.
    """

    def deco(cls):
        version = int(getattr(cls, "SCHEMA_VERSION", FIRST_SCHEMA_VERSION))
        loader = getattr(cls, load) if isinstance(load, str) else load
        RESULT_KINDS[kind] = ResultKind(kind, version, main_file, command, loader, dict(converters or {}))
        cls.KIND = kind
        return cls

    return deco


#: prune records and eval / ablate cells of schema 1 named the per-layer accuracy ``acc_layers`` and the
#: final-layer numbers ``accuracy`` / ``accuracy_norm``; schema 2 uses the names of the analysis result
#: (per layer ``accuracy`` beside ``dm``; final layer ``final_accuracy`` / ``final_accuracy_norm`` beside
#: ``final_dm``). Prune table rows had only the final ``accuracy``. Renamed all at once (no chaining).
ACCURACY_V1_NAMES = {"acc_layers": "accuracy", "accuracy": "final_accuracy", "accuracy_norm": "final_accuracy_norm"}


def rename_keys(block: Any, names: dict[str, str]) -> Any:
    """``block`` with its keys renamed by ``names`` (all at once, so ``a -> b`` and ``b -> c`` do not chain);
    anything but a dict is returned as is. For the small schema converters of :func:`register_result`."""
    return {names.get(k, k): v for k, v in block.items()} if isinstance(block, dict) else block


def result_kind(kind: str, folder: Path | str | None = None) -> ResultKind:
    """The registered :class:`ResultKind` of ``kind``.

    Raises:
        DeclensError: no result kind of that name (another program's or a newer declens's folder).
    """
    from .errors import DeclensError

    if kind not in RESULT_KINDS and _import_result_kinds is not None:
        _import_result_kinds()
    if kind not in RESULT_KINDS:
        where = f"run folder {str(folder)!r} holds" if folder is not None else "there is"
        raise DeclensError(f"{where} a result of unknown kind {kind!r} (this declens knows "
                           f"{', '.join(sorted(RESULT_KINDS))}); pass a folder written by a declens command, "
                           "or read it with the declens version that wrote it")
    return RESULT_KINDS[kind]


def stamp_schema_version(d: dict, rk: ResultKind) -> dict:
    """``d`` with ``schema_version`` set to the kind's (placed right after ``kind``)."""
    out = {}
    for k, v in d.items():
        if k != "schema_version":
            out[k] = v
        if k == "kind":
            out["schema_version"] = rk.schema_version
    if "schema_version" not in out:
        out = {"schema_version": rk.schema_version, **out}
    return out


def upgrade_result(rk: ResultKind, d: dict, folder: Path | str) -> dict:
    """The main JSON ``d`` of a ``rk.kind`` folder in the current schema: returned as is, converted from an
    older version by the kind's converters, or refused.

    A main JSON without ``schema_version`` is version :data:`FIRST_SCHEMA_VERSION` (written before versions
    were recorded).

    Raises:
        DeclensError: (one line naming the version found, the version read and the fix) an older version
            with no converter, or a newer version than this declens reads.
    """
    from .errors import DeclensError

    found = d.get("schema_version", FIRST_SCHEMA_VERSION)
    if not isinstance(found, int) or isinstance(found, bool):
        raise incomplete_error(folder, f"its {rk.main_file} has schema_version {found!r}, not a number")
    if found > rk.schema_version:
        raise DeclensError(f"run folder {str(folder)!r} holds a {rk.kind} result of schema version {found}, but this "
                           f"declens reads version {rk.schema_version}; upgrade declens to read it")
    v = found
    while v < rk.schema_version:
        conv = rk.converters.get(v)
        if conv is None:
            raise DeclensError(f"run folder {str(folder)!r} holds a {rk.kind} result of schema version {found}, but "
                               f"this declens reads version {rk.schema_version} (no converter from {v}); rerun "
                               f"'declens {rk.command}' to rewrite it")
        d = conv(dict(d))
        v += 1
    return stamp_schema_version(d, rk) if found != rk.schema_version else d


def load_result(path: Path | str, kind: str | None = None) -> Any:
    """The typed result of any run folder (``analysis`` -> :class:`AnalysisResult`, ``prune`` ->
    ``PruneResult``, ``study`` -> ``Study`` ...): the folder is verified against its manifest
    (:func:`verify_run_folder`), its kind looked up in :data:`RESULT_KINDS`, and an older schema converted
    or refused.

    Args:
        path: the run folder (or a file in it).
        kind: the kind expected (refused if the folder holds another); None accepts any.

    Raises:
        DeclensError: the folder is incomplete or modified, of an unknown kind, of another kind than
            ``kind``, or of a schema version this declens cannot read.
    """
    from .errors import DeclensError

    p = Path(path)
    folder = p.parent if p.is_file() else p
    d = _read_manifest_file(folder / MANIFEST_FILE) if folder.is_dir() else None
    if d is None or not isinstance(d.get("kind"), str):
        if kind is not None:
            return result_kind(kind).load(path)  # says what is missing ("holds no prune.json ...") or incomplete
        verify_run_folder(path)  # raises the reason (no such folder, no manifest, not a manifest)
    found = str(d["kind"])
    rk = result_kind(found, folder)
    if kind is not None and found != kind:
        want = result_kind(kind)
        raise DeclensError(f"run folder {str(folder)!r} holds a result of kind {found!r} (written by 'declens "
                           f"{rk.command}'), not {kind!r}; pass a folder written by 'declens {want.command}'")
    return rk.load(folder)  # every load verifies the folder against its manifest first


@dataclass
class Run:
    """One run folder found by :func:`find_runs`: its verified manifest and its kind's main JSON.

    Attributes:
        folder: the run folder; manifest: its verified :class:`RunManifest`.
        path: the main result file (``prune.json`` ...); data: its JSON in the current schema.
    """

    folder: Path
    manifest: RunManifest
    path: Path
    data: dict

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def config(self) -> dict:
        c = self.data.get("config")
        return c if isinstance(c, dict) else {}

    @property
    def provenance(self) -> dict:
        p = self.data.get("provenance")
        return p if isinstance(p, dict) else {}

    def load(self) -> Any:
        """The typed result (see :func:`load_result`)."""
        return result_kind(self.kind, self.folder).load(self.folder)


def read_run(path: Path | str) -> Run:
    """The run of one folder (or a file in it): verified, its kind looked up, its main JSON read and upgraded.

    Raises:
        DeclensError: as :func:`load_result`.
    """
    return run_of(verify_run_folder(path))


def run_of(m: RunManifest) -> Run:
    """The run of a folder whose manifest ``m`` was just verified (:func:`verify_run_folder`): its kind looked
    up, its main JSON read and upgraded (as :func:`read_run`, without hashing the folder again)."""
    rk = result_kind(m.kind, m.folder)
    if rk.main_file not in m.files:
        raise incomplete_error(m.folder, f"its manifest lists no {rk.main_file}")
    p = m.folder / rk.main_file
    return Run(m.folder, m, p, upgrade_result(rk, json.loads(p.read_text(encoding="utf-8")), m.folder))


def _looks_like_run(folder: Path) -> bool:
    """A folder declens wrote or began to write: a manifest (current or previous), or a top-level ``*.json``
    holding an object with a string ``kind`` (a result whose manifest is missing)."""
    if (folder / MANIFEST_FILE).is_file() or (folder / PREVIOUS_MANIFEST).is_file():
        return True
    for q in folder.glob("*.json"):
        try:
            d = json.loads(q.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(d, dict) and isinstance(d.get("kind"), str):
            return True
    return False


def find_runs(root: Path | str, kind: str | Sequence[str] | None = None, *, nested: bool = False,
              skip_incomplete: bool = False) -> list[Run]:
    """The run folders at ``root``: the one discovery of ``report``, ``correlate`` and ``study``.

    ``root`` is a run folder (or a file in it): that run (with ``nested``, also every run folder below it, a
    study's stages say). Otherwise every run folder below ``root``, at any depth, sorted by path (a run
    folder's own subfolders are searched only with ``nested``). A run folder is one declens wrote or
    began to write (:func:`_looks_like_run`); each is verified against its manifest and read through
    :func:`read_run`.

    Args:
        root: a run folder, a file in one, or a folder holding run folders.
        kind: keep only runs of this kind (or these kinds); None keeps all.
        nested: also search inside run folders.
        skip_incomplete: leave out run folders below ``root`` that fail verification (a run still working or
            killed) instead of raising; ``root`` itself is always verified.

    Raises:
        DeclensError: ``root`` does not exist or holds no declens result; a run folder is incomplete,
            modified, of an unknown kind or of an unreadable schema version.
    """
    from .errors import DeclensError

    p = Path(root)
    if not p.exists():
        raise DeclensError(f"run folder {str(p)!r} does not exist")
    folder = p.parent if p.is_file() else p
    runs: list[Run] = []
    is_run = p.is_file() or _looks_like_run(folder)
    if is_run:
        runs.append(read_run(p))
    if not is_run or nested:
        for dirpath, dirnames, _ in os.walk(folder):  # top-down, children sorted: runs come sorted by path
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # resume state, temp folders
            sub = Path(dirpath)
            if sub == folder or not _looks_like_run(sub):
                continue
            if not nested:
                dirnames[:] = []  # a run folder's own subfolders belong to it
            try:
                runs.append(read_run(sub))
            except DeclensError:
                if not skip_incomplete:
                    raise
    if not runs:
        raise DeclensError(f"{str(p)!r} holds no declens results (no run folder with a manifest.json below it); pass "
                           "folders written by 'declens analyze', 'declens prune', 'declens eval', ...")
    kinds = None if kind is None else {kind} if isinstance(kind, str) else set(kind)
    return [r for r in runs if kinds is None or r.kind in kinds]


@register_result("analysis", RESULT_FILE, "analyze")
@dataclass
class AnalysisResult:
    """A layer-wise decision analysis of one model on one task in one format.

    Attributes:
        config: what was asked for (model, task, format, selection, seed, dtype ...).
        provenance: versions, model and data fingerprints, timings.
        scores: the per-layer option scores.
        metrics: per-layer metrics computed from ``scores``.
        item_ids: id of every item, in order.
        option_labels: label of each option slot.
    """

    config: dict
    provenance: dict
    scores: LayerScores
    metrics: LayerMetrics
    item_ids: list[str]
    option_labels: list[str]
    extra: dict = field(default_factory=dict)
    SCHEMA_VERSION = 1  #: of ``result.json`` (see :func:`register_result`)

    @classmethod
    def from_scores(cls, scores: LayerScores, config: dict, provenance: dict, item_ids: list[str],
                    option_labels: list[str], decision_score: str = "raw") -> "AnalysisResult":
        """Compute metrics from scores. ``decision_score="norm"`` bases DM/OF on length-normalised cloze scores."""
        base = scores.norm_scores if decision_score == "norm" and scores.norm_scores is not None else scores.scores
        other = scores.norm_scores if decision_score != "norm" else None
        m = compute_metrics(base, scores.gold, scores.layer_ids, scores.n_options, norm_scores=other)
        return cls(config=config, provenance=provenance, scores=scores, metrics=m, item_ids=item_ids,
                   option_labels=option_labels)

    @property
    def summary(self) -> dict:
        return self.metrics.summary()

    def layer_rows(self) -> list[dict]:
        """One dict per layer (the CSV rows)."""
        m = self.metrics
        decisive = set(m.decisive_layers)
        rows = []
        for i, lid in enumerate(m.layer_ids):
            row = {"layer": lid, "position": i, "phase": "decisive" if lid in decisive else "silent",
                   "dm": m.dm[i], "dm_std": m.dm_std[i], "dm_median": m.dm_median[i], "dm_q25": m.dm_q25[i],
                   "dm_q75": m.dm_q75[i], "accuracy": m.acc[i]}
            if m.acc_norm is not None:
                row["accuracy_norm"] = m.acc_norm[i]
            row["kl"] = m.kl[i]
            for k, lab in enumerate(self.option_labels):
                row[f"of_{lab}"] = m.option_frequency[i, k]
            rows.append(row)
        return rows

    def sample_rows(self) -> list[dict]:
        """Final-layer prediction of every item."""
        s = self.scores
        base = s.scores
        preds = predictions(base[-1:])[0]
        marg = margins(base[-1:], s.gold)[0]
        out = []
        for n, iid in enumerate(self.item_ids):
            k = int(s.n_options[n])
            row = {"id": iid, "gold": int(s.gold[n]), "pred": int(preds[n]), "correct": bool(preds[n] == s.gold[n]),
                   "margin": float(marg[n]), "scores": [float(x) for x in base[-1, n, :k]]}
            if s.norm_scores is not None:
                row["pred_norm"] = int(np.nanargmax(s.norm_scores[-1, n, :k]))
            out.append(row)
        return out

    def to_dict(self) -> dict:
        return {
            "kind": "analysis",
            "config": self.config,
            "provenance": self.provenance,
            "summary": self.summary,
            "option_labels": self.option_labels,
            "gold_frequency": self.metrics.gold_frequency,
            "layers": self.layer_rows(),
            "samples": self.sample_rows(),
            **self.extra,
        }

    def save(self, out_dir: Path | str, plots: bool = False) -> Path:
        """Write ``scores.npz``, ``layers.csv``, ``result.json`` and (with ``plots``) the figures into
        ``out_dir`` as one run folder (see :class:`RunWriter`: the manifest is written last)."""
        out = Path(out_dir)
        s = self.scores
        arrays = {"scores": s.scores, "gold": s.gold, "n_options": s.n_options, "layer_ids": np.array(s.layer_ids)}
        if s.norm_scores is not None:
            arrays["norm_scores"] = s.norm_scores
        rows = self.layer_rows()
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, (float, np.floating)) else v) for k, v in r.items()})
        with RunWriter(out, "analysis") as run:
            run.npz(SCORES_FILE, **arrays)
            run.text(LAYERS_CSV, buf.getvalue())
            run.json(RESULT_FILE, self.to_dict())
            if plots:
                run.draw_figures(self, out)
        return out

    @classmethod
    def load(cls, out_dir: Path | str) -> "AnalysisResult":
        """Read a result folder written by :meth:`save`."""
        path, d = read_result_file(out_dir, RESULT_FILE, "analyze", also=(SCORES_FILE,))
        with np.load(path.parent / SCORES_FILE) as z:
            scores = LayerScores(
                layer_ids=[int(i) for i in z["layer_ids"]], scores=z["scores"], gold=z["gold"], n_options=z["n_options"],
                kind=score_kind(d["config"].get("format")),
                norm_scores=z["norm_scores"] if "norm_scores" in z.files else None,
            )
        extra = {k: v for k, v in d.items() if k not in ("kind", "schema_version", "config", "provenance", "summary",
                                                         "option_labels", "gold_frequency", "layers", "samples")}
        res = cls.from_scores(scores, d["config"], d["provenance"], [s["id"] for s in d["samples"]], d["option_labels"],
                              decision_score=d["config"].get("decision_score", "raw"))
        res.extra = extra
        return res


def check_output_dir(path: str | Path, option: str = "--out", *, file: bool = False, empty: bool = False) -> Path:
    """Check, before any work, that results can be written at ``path``; create nothing.

    Args:
        path: the results folder (or, with ``file``, the file) a command will write.
        option: the command-line option that named it (for the message).
        file: ``path`` is a file to write (``report --out page.html``), not a folder.
        empty: the folder must be new or empty (``export``).

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        DeclensError: ``path`` is an existing file (a folder is wanted) or folder (a file is wanted),
            a non-empty folder where ``empty`` asks for a new one, lies below a file, or its
            nearest existing folder cannot be written.
    """
    from .errors import DeclensError

    p = Path(path).expanduser()
    want = "file" if file else "folder"
    if file and p.is_dir():
        raise DeclensError(f"{option} {str(p)!r} is an existing folder; give the path of the {want} to write, "
                           f"e.g. {str(p / 'report.html')!r}")
    if not file and p.exists() and not p.is_dir():
        raise DeclensError(f"{option} {str(p)!r} is an existing file, not a folder; choose a new folder name")
    if empty and p.is_dir() and any(p.iterdir()):
        raise DeclensError(f"{option} {str(p)!r} exists and is not empty; choose a new folder or empty it")
    base = p.parent if file else p
    while not base.exists() and not base.is_symlink():
        if base == base.parent:
            break
        base = base.parent
    base = base if str(base) else Path(".")
    if not base.is_dir():
        raise DeclensError(f"{option} {str(p)!r} lies below {str(base)!r}, which is a file; choose another path")
    try:  # a real write: permissions, read-only file systems and pseudo file systems alike
        fd, probe = tempfile.mkstemp(dir=base, prefix=".declens-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DeclensError(f"{option} {str(p)!r} cannot be written ({str(base)!r}: {e.strerror or e}); "
                           "choose a writable location") from None
    return p
