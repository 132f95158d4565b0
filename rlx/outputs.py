"""Writing outputs so that nothing of the user's is lost and nothing is left half-written.

A directory output (an artifact, a report, a compile-cache entry) is filled in a hidden temp
directory next to its destination and renamed into place when complete. Before any work starts,
`guard_dir_output` refuses destinations whose replacement would destroy something that is not
ours: a file, a directory holding other files, the checkpoint itself or a directory holding it;
and it proves the destination writable. Leftovers of runs that died (`.NAME.partial-PID-*`,
`.NAME.old-PID`) are cleaned at the next run; an old copy whose replacement never arrived is put
back. A SIGINT / SIGTERM during the work aborts it (`rlx.interrupts`): the destination stays as
it was.

Several processes may write and read one destination at once (parallel compiles into one
`--out`, compile-cache hits while another process refreshes the entry): the renames that swap a
directory in, and the checks before them, hold an exclusive `dir_lock` on its parent; whoever
copies a finished directory holds it shared, so it never sees one half-swapped.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import rlx.interrupts as interrupts
from rlx.errors import RlxError

PARTIAL, OLD = "partial", "old"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)(?:-.*)?$")


class OutputError(RlxError):
    """An output path cannot be written safely."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(directory: Path, what: str, hint: str) -> None:
    """Prove that a directory could be created at (or inside) `directory` by creating and removing
    a probe in its nearest existing ancestor (permission bits alone miss read-only mounts, and
    root passes every permission check)."""
    base = _nearest_existing(directory)
    if not base.is_dir():
        raise OutputError(f"cannot write {what}: {base} is a file, not a directory", hint=hint)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".rlx-probe-", dir=base))
    except OSError as e:
        raise OutputError(f"cannot write {what} under {base}: {e.strerror}", hint=hint) from None


@contextmanager
def dir_lock(directory: Path, *, shared: bool = False) -> Iterator[None]:
    """An advisory lock (flock) on `directory` itself, so no lock file is left behind; released
    when the block ends or the process dies. Exclusive for whoever renames entries in it, shared
    for readers of an entry."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _check_replaceable(real: Path, given: Path, owned: Callable[[Path], bool], what: str, fix: str) -> None:
    if real.exists() and not real.is_dir():
        raise OutputError(f"{what} {given} is a file, not a directory: rlx writes a directory there", hint=fix)
    if real.is_dir() and any(real.iterdir()) and not owned(real):
        raise OutputError(f"{what} {given} is a directory with files rlx did not write: replacing it would "
                          "delete them", hint=fix)


def _fix(what: str) -> str:
    return f"choose another {what} path (a new or empty directory, or an earlier rlx {what})"


def guard_dir_output(dest: str | Path, *, owned: Callable[[Path], bool], what: str,
                     protect: Iterable[str | Path] = ()) -> Path:
    """The resolved directory `dest` names, once it is known safe to replace and writable; an
    `OutputError` otherwise. `owned(path)` says whether an existing directory is one of ours
    (an artifact, a report) that may be replaced; `protect` lists paths (the checkpoint) that
    must survive: `dest` may be neither one of them nor a directory holding one."""
    given = Path(dest).expanduser()
    real = given.resolve()  # a symlinked --out: replace the directory it points to, keep the link
    fix = _fix(what)
    for p in protect:
        kept = Path(p).expanduser().resolve()
        if real == kept or real in kept.parents:
            relation = "the checkpoint" if real == kept else "a directory holding the checkpoint"
            raise OutputError(f"{what} {given} is {relation} {p}: writing it would delete the checkpoint", hint=fix)
    if real.parent.is_dir():
        with dir_lock(real.parent, shared=True):  # not while another rlx swaps its own copy in
            _check_replaceable(real, given, owned, what, fix)
    else:
        _check_replaceable(real, given, owned, what, fix)
    check_writable(real.parent, f"{what} {given}", hint=f"{fix}, in a directory you can write")
    return real


def guard_file_output(path: Path, what: str) -> None:
    """A file output (`--logits-out`) can be written: not a directory, in a writable directory."""
    fix = f"choose a {what} path in a directory you can write"
    if path.is_dir():
        raise OutputError(f"{what} {path} is a directory; rlx writes a file there", hint=fix)
    check_writable(path.parent, f"{what} {path}", hint=fix)


def clean_leftovers(dest: Path) -> None:
    """Remove the temp and old copies that runs which died left next to `dest`; an old copy whose
    replacement never arrived (the run died between its two renames) becomes `dest` again."""
    if not dest.parent.is_dir():
        return
    for entry in dest.parent.iterdir():
        m = _LEFTOVER.match(entry.name)
        if m is None or m["name"] != dest.name or _alive(int(m["pid"])):
            continue
        if m["kind"] == OLD and not dest.exists():
            entry.rename(dest)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _remove_empty(directories: Iterable[Path]) -> None:
    """Remove these directories, deepest first, while they are empty (another process may have
    put something in one meanwhile: then it and its parents stay)."""
    for d in directories:
        try:
            d.rmdir()
        except OSError:
            return


def replace_dir_atomic(dest: str | Path, fill: Callable[[Path], None], *, owned: Callable[[Path], bool],
                       what: str, protect: Iterable[str | Path] = ()) -> Path:
    """`fill(tmp)` fills a hidden temp dir next to `dest`, which then replaces `dest` by renames.
    An exception or a signal on the way leaves `dest` as it was and no temp dir behind. Returns
    `dest` as given."""
    real = guard_dir_output(dest, owned=owned, what=what, protect=protect)
    created = [d for d in (real.parent, *real.parent.parents) if not d.exists()]  # deepest first
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {real.parent} for {what} {dest}: {e.strerror}",
                          hint=f"choose a {what} path in a directory you can write") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.{PARTIAL}-{os.getpid()}-", dir=real.parent))
    old = real.with_name(f".{real.name}.{OLD}-{os.getpid()}")
    try:
        with interrupts.handle_interrupts():
            fill(tmp)
            interrupts.check()  # a signal some library call swallowed still aborts the write
            with dir_lock(real.parent):
                clean_leftovers(real)
                # again: another process may have written there since the guard looked
                _check_replaceable(real, Path(dest), owned, what, _fix(what))
                try:
                    if real.exists():
                        real.rename(old)
                    tmp.rename(real)
                except BaseException:
                    if old.exists() and not real.exists():  # interrupted between the two renames
                        old.rename(real)
                    raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)  # a failed write leaves no directory it made on the way either
        raise
    shutil.rmtree(old, ignore_errors=True)
    return Path(dest)
