"""The directory an export writes (--out): what it may replace, the scratch directory the
artifact is assembled in, and the final move (torch-free).

The rules (README, "The artifact directory"):
- An --out that does not exist, or is an empty directory, is written (nothing in it to lose).
- An --out that is an artifact of ours (`artifact.is_artifact_dir`: its manifest.json names
  our format) is replaced only with --force. Files added to it since its export (anything its
  manifest does not account for: `added_files`) are kept, moved into the new artifact, with a
  `warning:` line naming them; except an engine built from one of its ONNX files (`X.engine`
  and its `.json`, `.build.log`, `.layers.json` beside `X.onnx`) when the new export's `X.onnx`
  is not the file it was built from: such an engine no longer fits, and the export refuses to
  replace --out, naming it (the new artifact is left in `NAME.new-PID`); the same when the new
  artifact has a file of an added file's name.
- Anything else there (a non-empty directory without our manifest, a file, a symbolic link) is
  refused, with or without --force, and left untouched.
- The artifact is assembled in `.NAME.partial-PID` beside --out (`claim`), which holds a marker
  file naming this process and host. The next export into the same parent removes such a
  directory once its process is gone (`remove_stale_partials`): SIGKILL leaves one behind.
- The final move (`move_into_place`) never replaces a non-empty directory it has not just checked
  to be ours: rename(2) refuses a non-empty target, renameat2(RENAME_EXCHANGE) swaps the two
  directories in one step (--out is never missing), and the previous artifact is deleted only
  after it has been moved aside and checked again. When something that is not ours (or, without
  --force, anything non-empty) appeared at --out during the run, it is kept and the finished
  artifact is left in `NAME.new-PID`, named in the error (exit 2).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path

from ..util import move_files, remove_if_stopped, signals_deferred
from .input_checks import OutputDirError, check_out_dir
from .manifest import FORMAT, MANIFEST_FILE, RTX_ENGINE_SUFFIX, is_artifact_dir

# Written into every scratch directory at creation: what makes a `.NAME.partial-PID` ours.
PARTIAL_MARKER = ".twbert-export-partial.json"
_PARTIAL_NAME = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)(-\d+)?$")
# renameat2(2) (Linux 3.15, glibc 2.28): swap two paths atomically.
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


class StalePartialRemoved(UserWarning):
    """A scratch directory of an export whose process is gone was removed."""


class AddedFilesKept(UserWarning):
    """Files added to an artifact since its export were moved into the artifact replacing it."""


# What `export.py build` writes beside X.onnx (trt/build.py, trt/cli.py): X.engine and these.
ENGINE_SUFFIXES = (".engine", ".engine.json", ".engine.build.log", ".engine.layers.json")
# What the export writes besides the ONNX files its manifest lists (reference/ is all ours).
_WRITTEN_NAMES = {MANIFEST_FILE, "report.json", "report.md", "DEPLOY.md", "build_on_device.sh"}


def _listed_onnx(directory: Path) -> dict[str, str] | None:
    """ONNX file -> sha256 of the files an artifact's manifest.json lists, and its tokenizer
    and answers files (sha256 ""); None when the manifest cannot be read."""
    try:
        data = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    files = data.get("files")
    entries = files if isinstance(files, list) else (
        list(files.values()) if isinstance(files, dict) else [])
    listed = {str(e["path"]): str(e.get("sha256", "")) for e in entries
              if isinstance(e, dict) and isinstance(e.get("path"), str)}
    for key in ("tokenizer", "answers"):
        if isinstance(data.get(key), str):
            listed[data[key]] = ""
    return listed


def added_files(directory: Path) -> list[str]:
    """Files (paths relative to `directory`) in an artifact that its export did not write: not
    in its manifest, not a file every export writes, not under reference/."""
    listed = _listed_onnx(directory) or {}
    found = sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                   if p.is_file() or p.is_symlink())
    return [f for f in found if f not in listed and f not in _WRITTEN_NAMES
            and not f.startswith("reference/") and f != PARTIAL_MARKER
            and not _rtx_engine_of(f, listed)]


def _rtx_engine_of(name: str, listed: dict[str, str]) -> bool:
    """Whether `name` is a TensorRT-RTX engine or its sidecar that the export itself wrote
    (`--rtx-engines`: <stem>.rtx.engine[.json] beside a listed <stem>.onnx): replaced with the
    artifact, not kept as the user's."""
    for suffix in (RTX_ENGINE_SUFFIX, RTX_ENGINE_SUFFIX + ".json"):
        if name.endswith(suffix):
            return name[:-len(suffix)] + ".onnx" in listed
    return False


def engine_source(name: str) -> str | None:
    """The ONNX file an engine file was built from (`X.onnx` for `X.engine`, `X.engine.json`,
    ...), None for a file that is not an engine build's."""
    for suffix in sorted(ENGINE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[:-len(suffix)] + ".onnx"
    return None


def carry_over_added(old: Path, new: Path) -> list[str]:
    """Move what was added to the artifact `old` since its export into the finished artifact
    `new` (the rules above); returns what was moved. Raises OutputDirError, moving nothing,
    when an added engine does not fit `new`'s ONNX file or `new` has a file of that name."""
    added = added_files(old)
    if not added:
        return []
    before, after = _listed_onnx(old) or {}, _listed_onnx(new) or {}
    stale, taken = [], []
    for name in added:
        source = engine_source(name)
        if source is not None and source in before and (
                source not in after or after[source] != before[source]):
            stale.append(name)
        elif (new / name).exists() or (new / name).is_symlink():
            taken.append(name)
    if stale or taken:
        why = []
        if stale:
            why.append(f"{_listing(stale)} (built from ONNX files this export changed: they do "
                       "not fit the new ones)")
        if taken:
            why.append(f"{_listing(taken)} (the new artifact has files of those names)")
        raise OutputDirError(f"--force would delete what was added to {old} since its export: "
                             f"{'; '.join(why)}: move them out of {old} (or delete them) and "
                             "run again")
    move_files(added, old, new)
    # The user's files are in it now: no longer a scratch directory anything may remove
    # (`discard_partial`, `remove_stale_partials` look for this marker).
    (new / PARTIAL_MARKER).unlink(missing_ok=True)
    warnings.warn(f"kept {_listing(added)}, added to {old} since its export: moved into the new "
                  "artifact", AddedFilesKept, stacklevel=3)
    return added


def _listing(names: list[str], shown: int = 6) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown
                                       else "")


def check_claim(out: Path, force: bool) -> None:
    """Raise OutputDirError unless `out` may be written by the rules above; changes nothing
    (the export calls it before loading the checkpoint, and `claim` again at the start)."""
    check_out_dir(out)
    if out.is_symlink():
        raise OutputDirError(f"--out {out} is a symbolic link: name the directory itself")
    if out.exists() and any(out.iterdir()):
        if not is_artifact_dir(out):
            raise OutputDirError(f"--out {out} is a directory that is not an export artifact "
                                 f"({_manifest_problem(out)}): --force replaces only an "
                                 "earlier export's directory; choose another --out")
        if not force:
            raise OutputDirError(f"{out} exists; pass --force to replace it, or --out another "
                                 "directory")


def _manifest_problem(directory: Path) -> str:
    """Why `directory` is not an artifact of ours, in a few words (see is_artifact_dir)."""
    manifest = directory / MANIFEST_FILE
    if manifest.is_symlink() or not manifest.is_file():
        return f"no {MANIFEST_FILE}"
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())
        return f"its {MANIFEST_FILE} is not readable JSON: {type(e).__name__}: {reason}"
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        return f"its {MANIFEST_FILE} is not twbert-export's (format {found!r}, not {FORMAT!r})"
    return f"its {MANIFEST_FILE} is not twbert-export's"


def claim(out: Path, force: bool) -> Path:
    """Check that `out` may be written (the rules above), remove stale scratch directories
    beside it, and return a new scratch directory there, marked as ours and registered for
    removal should a signal stop the process (the caller's `removed_if_stopped` block on it
    ends that)."""
    check_claim(out, force)
    engines = [f for f in added_files(out) if engine_source(f) is not None] \
        if is_artifact_dir(out) else []
    if engines:  # said before the export's minutes, decided at its end (`carry_over_added`)
        warnings.warn(f"{out} holds engine files added since its export ({_listing(engines)}): "
                      "they are kept if the ONNX files they were built from come out of this "
                      "export unchanged; otherwise --out is not replaced and the new artifact is "
                      "left beside it", AddedFilesKept, stacklevel=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out.parent)
    # Registered for removal in the same uninterruptible step that makes it: a signal right
    # after the mkdir would otherwise leave it behind (seen under load).
    with signals_deferred():
        work = _new_dir(out.parent, f".{out.name}.partial-{os.getpid()}")
        remove_if_stopped(work)
    (work / PARTIAL_MARKER).write_text(json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "out": str(out),
         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    return work


def _new_dir(parent: Path, name: str) -> Path:
    """A directory that did not exist before: `name`, else `name-1`, `name-2`, ..."""
    for attempt in range(1000):
        path = parent / (f"{name}-{attempt}" if attempt else name)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise OutputDirError(f"cannot create a new directory {name} in {parent}")


def _marker(directory: Path) -> dict | None:
    """The scratch marker of `directory`, or None when it has none (then it is not ours)."""
    try:
        data = json.loads((directory / PARTIAL_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(parent: Path) -> list[Path]:
    """Remove the scratch directories in `parent` whose export is gone: named
    `.NAME.partial-PID`, holding our marker with that PID and this host's name, and no process
    of that PID alive. Anything else is left alone. Returns what was removed."""
    removed = []
    for path in sorted(parent.iterdir()):
        match = _PARTIAL_NAME.match(path.name)
        if not match or path.is_symlink() or not path.is_dir():
            continue
        marker, pid = _marker(path), int(match["pid"])
        if (marker is None or marker.get("pid") != pid
                or marker.get("host") != socket.gethostname() or pid_alive(pid)):
            continue
        try:
            shutil.rmtree(path)
        except OSError as e:  # litter we cannot remove must not stop this export
            warnings.warn(f"could not remove {path}, left by an export (process {pid}) that was "
                          f"killed: {e.strerror}", StalePartialRemoved, stacklevel=2)
            continue
        warnings.warn(f"removed {path}, left by an export (process {pid}) that was killed",
                      StalePartialRemoved, stacklevel=2)
        removed.append(path)
    return removed


def discard_partial(work: Path) -> None:
    """Remove the scratch directory `work` if it is still ours (still holds our marker)."""
    marker = _marker(work)
    if marker is not None and marker.get("pid") == os.getpid():
        shutil.rmtree(work, ignore_errors=True)


def move_into_place(work: Path, out: Path, force: bool) -> None:
    """Put the finished artifact `work` at `out` by the rules above; if what is at `out` now may
    not be replaced, keep it, leave the artifact in `NAME.new-PID` and raise OutputDirError
    naming both."""
    try:
        _place(work, out, force)
    except OutputDirError as refused:
        kept = _new_dir(out.parent, f"{out.name}.new-{os.getpid()}")
        os.rename(work, kept)  # onto the empty directory just made: it cannot hold anything
        (kept / PARTIAL_MARKER).unlink(missing_ok=True)
        raise OutputDirError(f"{refused}; the new artifact is in {kept}") from None
    (out / PARTIAL_MARKER).unlink(missing_ok=True)


def _place(work: Path, out: Path, force: bool) -> None:
    try:
        os.rename(work, out)  # fails on a non-empty directory (or a file) at `out`
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
    if out.is_symlink() or not is_artifact_dir(out):
        raise OutputDirError(f"{out} appeared during the export and is not an export artifact: "
                             "kept it")
    if not force:
        raise OutputDirError(f"{out} appeared during the export (pass --force to replace an "
                             "artifact): kept it")
    carry_over_added(out, work)  # before the swap: a refusal leaves both as they are
    if exchange(work, out):
        previous = work  # what was at `out` a moment ago
        if not is_artifact_dir(previous):  # replaced between the check and the swap
            exchange(work, out)
            raise OutputDirError(f"{out} was replaced during the export by a directory that is "
                                 "not an export artifact: kept it")
        shutil.rmtree(previous)
        return
    # No atomic swap here: move the old artifact aside, then the new one in. In between --out is
    # missing; whatever appears there then is not replaced (rename refuses a non-empty target)
    # and the old artifact stays aside, named in the error.
    aside = _new_dir(out.parent, f".{out.name}.old-{os.getpid()}")
    os.rename(out, aside)
    if not is_artifact_dir(aside):
        os.rename(aside, out)
        raise OutputDirError(f"{out} was replaced during the export by a directory that is not "
                             "an export artifact: kept it")
    try:
        os.rename(work, out)
    except OSError as e:
        raise OutputDirError(f"{out} appeared again while the previous artifact was being moved "
                             f"aside ({e.strerror}): kept it; the previous artifact is in "
                             f"{aside}") from None
    shutil.rmtree(aside)


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE, man 2 rename); False,
    changing nothing, where the system or the file system does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc before 2.28, or another libc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))
