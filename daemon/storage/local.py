"""Local-directory backend: one file per key under a root directory.

Atomicity comes from the POSIX rename: ``put`` writes ``<dir>/.tmp-<uuid>-<name>`` in the
target's own directory (same file system, so the rename cannot degrade to a copy), fsyncs
the file, renames it over the target and fsyncs the directory, so the new entry survives a
power loss. ``put_if_absent`` links the temporary to the target instead of renaming it:
``link(2)`` refuses an existing name atomically. A crash leaves at most the
temporary behind; ``list`` never shows it and ``cleanup_temporaries`` removes it.
``put_batched`` does what ``put`` does without the fsyncs (starting the writeback instead),
and ``sync`` fsyncs a whole batch's files and then each directory once: the save
pipeline's blobs, before their manifest.

``claim`` takes an exclusive ``flock`` on ``<root>/.ckptd.lock`` (outside the key space) and
writes the holder's description into it; the kernel drops the lock when the holder closes
the storage or dies, SIGKILL included, so a crashed daemon never blocks its successor. The
file itself stays: unlinking it would let a second process lock a fresh inode.

Checkpoints are the training job's private data, so files are created ``0600`` and the
directories the backend makes (the root included, when it creates it) ``0700``, whatever
the process's umask; ``file_mode`` widens that for a group (``0640`` gives ``0750``
directories: each directory gets execute where the file mode has read).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ckptd.daemon.errors import StorageFullError, StorageInUseError
from ckptd.daemon.storage.base import (
    TEMP_PREFIX,
    KeyNotFoundError,
    Storage,
    StorageError,
    check_range,
    is_valid_key,
    validate_key,
    validate_prefix,
)

# How often put retries when a concurrent delete removes the freshly created directory.
_MKDIR_ATTEMPTS = 5
# Room left for ".tmp-<32 hex>-" inside the 255-byte file-name limit.
_TEMP_NAME_CHARS = 100
LOCK_NAME = ".ckptd.lock"
DEFAULT_FILE_MODE = 0o600


def directory_mode(file_mode: int) -> int:
    """The mode of directories holding files of ``file_mode``: execute wherever it reads."""
    return file_mode | ((file_mode & 0o444) >> 2)


class LocalStorage(Storage):
    """Objects as files under ``root``; see the module docstring for the commit protocol."""

    def __init__(
        self, root: str | os.PathLike[str], *, file_mode: int = DEFAULT_FILE_MODE
    ) -> None:
        """Opens (and creates, with parents) the directory ``root``; files get
        ``file_mode``, directories ``directory_mode(file_mode)``."""
        self.root = Path(os.path.abspath(os.fspath(root)))
        self.file_mode = file_mode
        self.dir_mode = directory_mode(file_mode)
        try:
            if not self.root.is_dir():
                self.root.mkdir(parents=True, exist_ok=True)
                os.chmod(self.root, self.dir_mode)
        except OSError as exc:
            raise StorageError(f"cannot create storage directory {self.root}: {exc}") from exc
        if not self.root.is_dir():
            raise StorageError(f"storage path {self.root} exists and is not a directory")
        self.url = f"file://{self.root}"
        self._lock_fd: int | None = None

    def claim(self, holder: str) -> None:
        if self._lock_fd is not None:
            raise RuntimeError(f"{self.url} is already claimed by this process")
        path = self.root / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self.file_mode)
        except OSError as exc:
            raise StorageError(f"cannot open the lock file {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            current = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise StorageInUseError(
                f"storage {self.url} is in use by {current or 'another process'}; one process "
                "at a time may write it (read-only commands such as ls and verify are fine)"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"cannot lock {path}: {exc}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode("utf-8") + b"\n", 0)
        self._lock_fd = fd

    def close(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    def put(self, key: str, data: bytes | memoryview) -> None:
        self._put(key, data, durable=True)

    def put_batched(self, key: str, data: bytes | memoryview) -> None:
        """``put`` without its two fsyncs: the bytes' writeback is started (so it overlaps
        whatever the caller does next) and ``sync`` waits for it."""
        self._put(key, data, durable=False)

    def sync(self, keys: Iterable[str]) -> None:
        """fsyncs each file, then each directory once. After the first fsync's journal
        commit, which carries every file's metadata, the others mostly wait for data
        already on its way (``put_batched`` started it)."""
        paths = {key: self._path(key) for key in keys}
        try:
            for key, path in paths.items():
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except FileNotFoundError as exc:
                    raise KeyNotFoundError(f"sync of {key!r} in {self.url}: it is gone "
                                           f"(deleted before it was durable)") from exc
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for directory in dict.fromkeys(path.parent for path in paths.values()):
                _fsync_dir(directory)
        except KeyNotFoundError:
            raise
        except OSError as exc:
            error = StorageFullError if exc.errno in (errno.ENOSPC, errno.EDQUOT) else StorageError
            raise error(f"sync of {len(paths)} keys in {self.url} failed: {exc}") from exc

    def _put(self, key: str, data: bytes | memoryview, *, durable: bool) -> None:
        path = self._path(key)
        view = memoryview(data).cast("B")
        tmp = _temp_path(path)
        try:
            self._write_temp(tmp, view, durable=durable)
            os.replace(tmp, path)
            if durable:
                _fsync_dir(path.parent)
        except OSError as exc:
            _unlink_quietly(tmp)
            raise _write_error("put", key, len(view), self.url, exc) from exc

    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        """Writes and fsyncs a temporary, then ``link(2)``s it to the final name: the link
        fails with EEXIST when the name exists, atomically (unlike a check then a rename),
        and the name never shows a partly written file. The temporary is then unlinked."""
        path = self._path(key)
        view = memoryview(data).cast("B")
        tmp = _temp_path(path)
        try:
            self._write_temp(tmp, view)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                _unlink_quietly(tmp)
            _fsync_dir(path.parent)
        except OSError as exc:
            _unlink_quietly(tmp)
            raise _write_error("put_if_absent", key, len(view), self.url, exc) from exc
        return True

    def get(self, key: str, *, start: int = 0, end: int | None = None) -> bytes:
        path = self._path(key)
        check_range(start, end)
        try:
            # Buffered reads loop until ``n`` bytes or EOF, unlike a single raw read(2).
            with open(path, "rb") as f:
                f.seek(start)
                return f.read(-1 if end is None else end - start)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise KeyNotFoundError(f"key {key!r} not found in {self.url}") from exc
        except OSError as exc:
            raise StorageError(f"get {key!r} from {self.url} failed: {exc}") from exc

    def read_into(self, key: str, out: memoryview) -> int:
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                done = 0
                # A raw read may return fewer bytes than asked before the end of the file.
                while done < len(out) and (got := f.readinto(out[done:])):
                    done += got
                return done
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise KeyNotFoundError(f"key {key!r} not found in {self.url}") from exc
        except OSError as exc:
            raise StorageError(f"read of {key!r} from {self.url} failed: {exc}") from exc

    def size(self, key: str) -> int:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise KeyNotFoundError(f"key {key!r} not found in {self.url}") from exc
        except OSError as exc:
            raise StorageError(f"size of {key!r} in {self.url} failed: {exc}") from exc
        if not path.is_file():
            raise KeyNotFoundError(f"key {key!r} not found in {self.url} (it is a directory)")
        return st.st_size

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        try:
            keys = [key for key, _ in self._walk(prefix)
                    if not _is_temp(key) and key != LOCK_NAME]
        except OSError as exc:
            raise StorageError(f"list {prefix!r} in {self.url} failed: {exc}") from exc
        return sorted(key for key in keys if is_valid_key(key))

    def delete(self, keys: Iterable[str]) -> None:
        paths = [self._path(key) for key in keys]
        touched: set[Path] = set()
        try:
            for path in paths:
                try:
                    path.unlink()
                except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                    continue
                touched.add(path.parent)
            for directory in touched:
                # A concurrent delete may already have pruned the emptied directory; its
                # removal takes the unlinked entry with it, so there is nothing left to sync.
                with contextlib.suppress(FileNotFoundError):
                    _fsync_dir(directory)
        except OSError as exc:
            raise StorageError(f"delete of {len(paths)} keys in {self.url} failed: {exc}") from exc
        self._prune_empty_dirs(touched)

    def move(self, key: str, new_key: str) -> None:
        """A rename within the root: atomic, and it needs no free space (a full disk can
        still quarantine). Both directories are fsynced so that the move survives a crash."""
        path, new_path = self._path(key), self._path(new_key)
        try:
            self._makedirs_durable(new_path.parent)
            os.replace(path, new_path)
            _fsync_dir(new_path.parent)
            _fsync_dir(path.parent)
        except (FileNotFoundError, NotADirectoryError) as exc:
            if not path.exists():
                raise KeyNotFoundError(f"key {key!r} not found in {self.url}") from exc
            raise StorageError(f"move {key!r} to {new_key!r} in {self.url} failed: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"move {key!r} to {new_key!r} in {self.url} failed: {exc}") from exc
        self._prune_empty_dirs({path.parent})

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the root's file system."""
        try:
            stat = os.statvfs(self.root)
        except OSError as exc:
            raise StorageError(f"cannot read free space of {self.url}: {exc}") from exc
        return stat.f_bavail * stat.f_frsize

    def cleanup_temporaries(self, *, min_age_s: float = 0.0) -> int:
        """Removes ``.tmp-*`` files of crashed puts older than ``min_age_s``; returns the count."""
        cutoff = time.time() - min_age_s
        removed: set[Path] = set()
        try:
            for key, path in self._walk(""):
                if _is_temp(key) and _mtime(path) <= cutoff:
                    _unlink_quietly(path)
                    removed.add(path)
        except OSError as exc:
            raise StorageError(f"cleanup of temporaries in {self.url} failed: {exc}") from exc
        self._prune_empty_dirs({path.parent for path in removed})
        return len(removed)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _write_temp(self, tmp: Path, view: memoryview, *, durable: bool = True) -> None:
        """Creates ``tmp`` (and its directories) holding ``view``, fsynced (or, not
        ``durable``, its writeback started for a later ``sync``)."""
        fd = self._create_temp(tmp)
        try:
            _write_all(fd, view)
            if durable:
                os.fsync(fd)
            else:
                _start_writeback(fd)
        finally:
            os.close(fd)

    def _create_temp(self, tmp: Path) -> int:
        """Creates the directory chain and the temporary; retries if a delete prunes the dir."""
        for attempt in range(_MKDIR_ATTEMPTS):
            try:
                self._makedirs_durable(tmp.parent)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC)
                os.fchmod(fd, self.file_mode)  # the umask narrows os.open's mode, never this
                return fd
            except FileNotFoundError:
                if attempt == _MKDIR_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _makedirs_durable(self, directory: Path) -> None:
        """Creates missing directories and fsyncs each new entry's parent (a new file in a
        new directory is not durable until the directory's own entry is)."""
        if directory.is_dir():
            return
        missing: list[Path] = []
        while not directory.is_dir() and directory != self.root:
            missing.append(directory)
            directory = directory.parent
        for new_dir in reversed(missing):
            try:
                new_dir.mkdir()
                os.chmod(new_dir, self.dir_mode)
            except FileExistsError:
                pass  # a concurrent put made it (with the same mode)
            _fsync_dir(new_dir.parent)

    def _walk(self, prefix: str) -> Iterator[tuple[str, Path]]:
        """Yields (key-like relative name, path) of every regular file below ``prefix``."""
        stack = [self.root.joinpath(*prefix.split("/")) if prefix else self.root]
        while stack:
            directory = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file():
                    path = Path(entry.path)
                    yield path.relative_to(self.root).as_posix(), path

    def _prune_empty_dirs(self, directories: Iterable[Path]) -> None:
        """Removes emptied directories bottom-up, never the root; a racing put recreates
        any it needs (``_create_temp`` retries)."""
        for deepest in sorted(set(directories), key=lambda p: len(p.parts), reverse=True):
            directory = deepest
            while directory != self.root and self.root in directory.parents:
                try:
                    directory.rmdir()
                except OSError:
                    break
                directory = directory.parent


def _temp_path(path: Path) -> Path:
    """A unique temporary beside ``path`` (same directory: same file system for the rename)."""
    return path.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}-{path.name[:_TEMP_NAME_CHARS]}"


def _write_error(
    operation: str, key: str, size: int, url: str, exc: OSError
) -> StorageError:
    """``StorageFullError`` for a full disk or quota, else ``StorageError``."""
    error = StorageFullError if exc.errno in (errno.ENOSPC, errno.EDQUOT) else StorageError
    return error(f"{operation} {key!r} ({size} bytes) in {url} failed: {exc}")


def _is_temp(key: str) -> bool:
    return key.rsplit("/", 1)[-1].startswith(TEMP_PREFIX)


def _mtime(path: Path) -> float:
    """Modification time, or +inf for a file that vanished (a put that just renamed it)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _write_all(fd: int, view: memoryview) -> None:
    # os.write may write less than asked (signals, >2 GiB chunks on Linux): loop on slices,
    # which are views, so a large checkpoint blob is never copied in Python.
    offset = 0
    while offset < len(view):
        offset += os.write(fd, view[offset:])


def _load_sync_file_range() -> Callable[[int], object] | None:
    """``sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)``: starts writing a file's dirty
    pages back without waiting (Linux only; elsewhere None, and ``sync`` does it all)."""
    if sys.platform != "linux":
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return lambda fd: call(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h
_sync_file_range = _load_sync_file_range()


def _start_writeback(fd: int) -> None:
    # Advice only: a failure here surfaces in ``sync``'s fsync, which is what counts.
    if _sync_file_range is not None:
        _sync_file_range(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
