"""Crash-safe writes of output folders and files: at every instant the destination holds the complete old or the
complete new content, whatever kills the writer.

The new content is written into a staging folder beside the destination, every file and the folder are fsynced,
then the two are swapped with renameat2(RENAME_EXCHANGE) on Linux (one atomic step) or, where that is missing, two
renames, between which the old content waits under a retired name that the next save or load of the destination
renames back (recover). SIGTERM (sent by timeout, Slurm, docker) is turned into an exception while a write runs, so
the staging folder is removed as after Ctrl-C; after a SIGKILL the next write to the same destination removes it.

A destination is only replaced when the caller asks (overwrite), and never when it is a file, a link, or a folder
that holds no model or adapter (lords refuses to delete what it cannot recognise as its own kind of output).
check_destination runs all of this, plus writability and free space, before minutes of work.

No torch here: the kill test runs this module in fresh processes.
"""

import ctypes
import errno
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

STAGING = "lords-staging"  # .{name}.lords-staging-{pid}-{hex}: the new content being written
RETIRED = "lords-retired"  # .{name}.lords-retired-{pid}-{hex}: the old content between the two fallback renames
# what marks a folder as one lords may replace: a model (config.json) or an adapter (adapter_config.json)
REPLACEABLE_MARKERS = ("config.json", "adapter_config.json")
RENAME_EXCHANGE = 2
AT_FDCWD = -100


class DestinationError(OSError):
    pass


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _leftovers(path: Path, kind: str) -> list[Path]:
    """Staging or retired siblings of path left by writers that are no longer running."""
    found = []
    for candidate in path.parent.glob(f".{path.name}.{kind}-*"):
        pid = candidate.name.removeprefix(f".{path.name}.{kind}-").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            found.append(candidate)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(path: str | Path) -> None:
    """Undo what a killed writer left beside path: its retired old content goes back under the name if the name is
    empty (a kill between the fallback's two renames), and staging folders are removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    retired = _leftovers(path, RETIRED)
    if retired and not os.path.lexists(path):
        retired.pop().rename(path)
    for leftover in retired + _leftovers(path, STAGING):
        _remove(leftover)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_destination(path: str | Path, overwrite: bool, folder: bool = True, needed_bytes: int = 0,
                      replaceable: Callable[[Path], bool] | None = None) -> Path:
    """Refuse, before any work, a destination that write_folder (folder) or write_file would refuse or could not
    write: it exists and overwrite is not set, it is of the other kind or a link, it is a folder lords did not
    write, its folder is not writable, or has less than needed_bytes free. Creates the parent folders."""
    path = Path(path)
    recover(path)
    if path.is_symlink():
        raise DestinationError(f"{path} is a symbolic link; give the real path (lords does not replace links)")
    if path.exists():
        if folder and not path.is_dir():
            raise DestinationError(f"{path} is a file, not a folder; choose another output path")
        if not folder and path.is_dir():
            raise DestinationError(f"{path} is a folder, not a file; choose another output path")
        if folder and any(path.iterdir()) or not folder:
            if not overwrite:
                raise FileExistsError(f"{path} exists{' and is not empty' if folder else ''}; pass overwrite=True "
                                      "(--overwrite) to replace it")
            ours = replaceable or (lambda p: any((p / marker).is_file() for marker in REPLACEABLE_MARKERS))
            if not ours(path):
                what = "holds no config.json or adapter_config.json" if folder else "is not a file lords wrote"
                raise DestinationError(f"{path} {what}; lords replaces only its own outputs, so remove it yourself "
                                       "or choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _staged(_sibling(path, STAGING)) as probe:
            probe.mkdir()
    except OSError as error:
        raise DestinationError(f"cannot write to {path.parent}: {error.strerror or error}") from None
    free = shutil.disk_usage(path.parent).free
    if free < needed_bytes:
        raise DestinationError(f"{path.parent} has {_size(free)} free; the output needs about {_size(needed_bytes)}")
    return path


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def write_folder(folder: str | Path, overwrite: bool, write: Callable[[Path], None], needed_bytes: int = 0) -> Path:
    """Run write(staging) in a staging folder beside folder, fsync it, and swap it into place (module docstring)."""
    folder = Path(folder)
    with _signals_clean_up():
        check_destination(folder, overwrite, True, needed_bytes)
        with _staged(_sibling(folder, STAGING)) as staging:  # after an exchange, it holds the old content
            staging.mkdir()
            write(staging)
            _fsync_tree(staging)
            with _signals_deferred():
                _swap(staging, folder)
    return folder


def write_file(path: str | Path, overwrite: bool, write: Callable[[Path], None],
               replaceable: Callable[[Path], bool] | None = None) -> Path:
    """Run write(staging file) beside path, fsync it and rename it over path (atomic for a file)."""
    path = Path(path)
    with _signals_clean_up():
        check_destination(path, overwrite, False, replaceable=replaceable)
        with _staged(_sibling(path, STAGING)) as staging:
            write(staging)
            _fsync(staging)
            with _signals_deferred():
                staging.replace(path)
                _fsync(path.parent)
    return path


def _swap(staging: Path, folder: Path) -> None:
    if not os.path.lexists(folder):
        staging.rename(folder)
    elif not _exchange(staging, folder):
        retired = _sibling(folder, RETIRED)
        folder.rename(retired)  # a kill here leaves the old content under retired; recover() renames it back
        staging.rename(folder)
        shutil.rmtree(retired)
    _fsync(folder.parent)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the call or the file system lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, f"cannot swap {first} into {second}: {os.strerror(code)}")


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


class Terminated(BaseException):
    """SIGTERM during a write: like KeyboardInterrupt, not caught by `except Exception`."""


# This process's staging paths, which a signal's handler removes before raising: a `finally` that would remove them
# can itself be cut short by the signal (the kill test saw it leave a staging folder 1 time in 30).
_active: set[Path] = set()
_swap_state = {"deferred": 0, "pending": None}


def _interrupt(signum: int):
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(f"terminated by signal {signum}")


def _on_signal(signum, frame):
    if _swap_state["deferred"]:
        _swap_state["pending"] = signum
        return
    for path in list(_active):
        _remove(path)
    raise _interrupt(signum)


@contextmanager
def _staged(path: Path):
    """A staging path, removed on leaving the block, however it is left."""
    _active.add(path)
    try:
        yield path
    finally:
        _remove(path)
        _active.discard(path)


@contextmanager
def _signals_clean_up():
    """While a write runs in the main thread, SIGTERM and SIGINT remove its staging paths, then raise."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM wait until the swap is done: the fallback's two renames are never split."""
    _swap_state["deferred"] += 1
    try:
        yield
    finally:
        _swap_state["deferred"] -= 1
    pending, _swap_state["pending"] = _swap_state["pending"], None
    if pending is not None:
        raise _interrupt(pending)
