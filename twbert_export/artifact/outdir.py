"""The directory an export writes (--out): what it may replace, the scratch directory the
artifact is assembled in, and the final move (torch-free).

The rules (README, "The artifact directory"):
- An --out that does not exist, or is an empty directory, is written (nothing in it to lose).
- An --out that is an artifact of ours (`artifact.is_artifact_dir`: its manifest.json names
  our format) is replaced only with --force, files added to it since included.
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

from ..util import remove_if_stopped, signals_deferred
from .input_checks import OutputDirError, check_out_dir
from .manifest import is_artifact_dir

# Written into every scratch directory at creation: what makes a `.NAME.partial-PID` ours.
PARTIAL_MARKER = ".twbert-export-partial.json"
_PARTIAL_NAME = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)(-\d+)?$")
# renameat2(2) (Linux 3.15, glibc 2.28): swap two paths atomically.
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


class StalePartialRemoved(UserWarning):
    """A scratch directory of an export whose process is gone was removed."""


def claim(out: Path, force: bool) -> Path:
    """Check that `out` may be written (the rules above), remove stale scratch directories
    beside it, and return a new scratch directory there, marked as ours and registered for
    removal should a signal stop the process (the caller's `removed_if_stopped` block on it
    ends that)."""
    check_out_dir(out)
    if out.is_symlink():
        raise OutputDirError(f"--out {out} is a symbolic link: name the directory itself")
    if out.exists() and any(out.iterdir()):
        if not is_artifact_dir(out):
            raise OutputDirError(f"--out {out} is a directory that is not an export artifact "
                                 "(no twbert-export manifest.json): --force replaces only an "
                                 "earlier export's directory; choose another --out")
        if not force:
            raise OutputDirError(f"{out} exists; pass --force to replace it, or --out another "
                                 "directory")
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
        (kept / PARTIAL_MARKER).unlink()
        raise OutputDirError(f"{refused}; the new artifact is in {kept}") from None
    (out / PARTIAL_MARKER).unlink()


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
