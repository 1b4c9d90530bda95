"""Faults of the machine that a user can fix: a full disk, a locked or a read-only database.

`classify` recognises them in what SQLite, PostgreSQL (psycopg) or the OS raised and returns a
typed error whose message says what is wrong (free space, which process holds the lock, which file
cannot be written, which server cannot be reached) and whose hint says what to do; the edge
(app/main.py) turns it into the one JSON/HTML error shape.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sqlite3
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url

from app.errors import UserError
from app.settings import Settings

if TYPE_CHECKING:
    import psycopg

try:
    from psycopg import Error as _PostgresError

    POSTGRES_ERRORS: tuple[type[Exception], ...] = (_PostgresError,)
except ImportError:  # a SQLite-only worker (the GPU machine's site) may have no PostgreSQL driver
    POSTGRES_ERRORS = ()

# SQLite's primary result codes (the low byte of an extended code).
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_FULL, SQLITE_CANTOPEN = 5, 6, 8, 13, 14
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# In WAL mode the write lock is one byte of the `-shm` file (SQLite's os_unix.c: UNIX_SHM_BASE).
WAL_WRITE_LOCK_BYTE = 120
# PostgreSQL's SQLSTATEs for the same faults: disk full, a read-only server (a hot standby, or
# default_transaction_read_only), a lock wait past lock_timeout, and a server going away.
PG_DISK_FULL, PG_READ_ONLY, PG_LOCK_NOT_AVAILABLE = "53100", "25006", "55P03"
PG_SERVER_GONE = frozenset({"57P01", "57P02", "57P03", "08000", "08003", "08006", "08001"})
# Lost connections psycopg reports without a SQLSTATE, by the words of libpq's message.
PG_CONNECTION_WORDS = (
    "could not connect",
    "connection failed",
    "connection refused",
    "terminating connection",
    "server closed the connection",
    "connection is closed",
    "the connection is lost",
    "consuming input failed",
)
FS_IOC_GETFLAGS = 0x80086601
FS_IMMUTABLE_FL = 0x10


class DiskFull(UserError):
    status_code = 507
    code = "disk_full"


class DatabaseLocked(UserError):
    status_code = 503
    code = "database_locked"


class DatabaseReadOnly(UserError):
    status_code = 503
    code = "database_read_only"


class DatabaseUnreachable(UserError):
    status_code = 503
    code = "database_unreachable"


def classify(exc: BaseException, settings: Settings) -> UserError | None:
    """The typed error for a full disk, a locked or a read-only database, else None."""
    for cause in _chain(exc):
        if isinstance(cause, sqlite3.Error):
            return _sqlite_fault(cause, settings)
        if isinstance(cause, POSTGRES_ERRORS):
            return _postgres_fault(cause, settings)  # type: ignore[arg-type]
        if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
            return disk_full(settings, cause.filename)
        if isinstance(cause, OSError) and cause.errno == errno.EROFS and cause.filename:
            return read_only(Path(os.fsdecode(cause.filename)))
    return None


def is_disk_full(exc: BaseException) -> bool:
    for cause in _chain(exc):
        if isinstance(cause, sqlite3.Error):
            return _primary_code(cause) == SQLITE_FULL
        if isinstance(cause, POSTGRES_ERRORS):
            return getattr(cause, "sqlstate", None) == PG_DISK_FULL
        if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
            return True
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, the driver's error SQLAlchemy wraps (`.orig`) and its causes."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        cause = todo.pop(0)
        if cause is None or cause in seen:
            continue
        seen.append(cause)
        todo += [getattr(cause, "orig", None), cause.__cause__, cause.__context__]
    return seen


def _primary_code(error: sqlite3.Error) -> int | None:
    code = getattr(error, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _sqlite_fault(error: sqlite3.Error, settings: Settings) -> UserError | None:
    code = _primary_code(error)
    path = database_path(settings)
    if code == SQLITE_FULL:
        return disk_full(settings, str(path) if path else None)
    if path is None:
        return None
    if code in (SQLITE_BUSY, SQLITE_LOCKED):
        return locked(path, settings.database_busy_timeout_seconds)
    if code == SQLITE_READONLY:
        return read_only(path)
    if code == SQLITE_CANTOPEN and read_only_reason(path) is not None:
        return read_only(path)  # a read-only folder or mount: SQLite cannot even open the file
    return None


def _postgres_fault(error: psycopg.Error, settings: Settings) -> UserError | None:
    """The same faults from a PostgreSQL server: its disk full, read-only, a lock not granted,
    or the server not reachable (down, restarting, or it ended this connection)."""
    import psycopg

    state = error.sqlstate
    server = database_server(settings)
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    if state == PG_DISK_FULL:
        return DiskFull(
            f"The PostgreSQL server {server} has no room left on its disk ({first_line}).",
            hint="Free space on the database server's disk (or grow it), then try again; deleting "
            "datasets and jobs you no longer need also frees rows.",
        )
    if state == PG_READ_ONLY:
        return DatabaseReadOnly(
            f"The PostgreSQL server {server} accepts no writes ({first_line}).",
            hint="Point TUNEBOARD_DATABASE_URL at the primary server, not a read-only standby, "
            "and check that default_transaction_read_only is off for its user.",
        )
    if state == PG_LOCK_NOT_AVAILABLE:
        return DatabaseLocked(
            f"The PostgreSQL database {server} is locked: another session held a lock Tuneboard "
            f"needed for longer than the lock timeout ({first_line}).",
            hint="Try again; if it keeps happening, look for a long-running session in "
            "pg_stat_activity and end it.",
        )
    lower = first_line.lower()
    if state in PG_SERVER_GONE or (
        isinstance(error, psycopg.OperationalError)
        and any(words in lower for words in PG_CONNECTION_WORDS)
    ):
        return DatabaseUnreachable(
            f"The PostgreSQL server {server} cannot be reached ({first_line}).",
            hint="Check that the server is running and accepts connections from this machine "
            "(`pg_isready -h HOST -p PORT`) and that TUNEBOARD_DATABASE_URL names it; Tuneboard "
            "reconnects by itself once it answers.",
        )
    return None


def database_server(settings: Settings) -> str:
    """host:port/database of the configured PostgreSQL URL (no user, no password)."""
    url = make_url(settings.resolved_database_url)
    return f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"


def database_path(settings: Settings) -> Path | None:
    url = make_url(settings.resolved_database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


# --- disk full ----------------------------------------------------------------------------------


def disk_full(settings: Settings, filename: str | bytes | None = None) -> DiskFull:
    where = settings.resolved_data_dir
    if filename:
        path = Path(os.fsdecode(filename))
        where = next((p for p in (path, *path.parents) if p.is_dir()), where)
    try:
        usage = shutil.disk_usage(where)
        room = f"{_size(usage.free)} free of {_size(usage.total)}"
    except OSError:
        room = "free space unknown"
    return DiskFull(
        f"The disk holding {where} is full ({room}).",
        hint="Free space on that disk: delete datasets, jobs (with their checkpoints) or exports "
        "you no longer need (deleting works on a full disk), or move the data dir to a bigger "
        "disk. Then try again.",
    )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


# --- locked -------------------------------------------------------------------------------------


def locked(path: Path, busy_timeout_seconds: float) -> DatabaseLocked:
    holders = write_lock_holders(path)
    if holders:
        who = ", ".join(describe_process(pid) for pid in holders)
        hint = (
            f"Wait for it to finish its write and try again; if it is stuck, stop it "
            f"(`kill {' '.join(map(str, holders))}`)."
        )
    else:
        who = "another process"
        hint = (
            "Try again; if it keeps happening, look for a process that keeps the database open in "
            f"a write transaction (`fuser {path}`) and stop it."
        )
    return DatabaseLocked(
        f"The database {path} is locked: {who} held its write lock for longer than the busy "
        f"timeout ({busy_timeout_seconds:g} s).",
        hint=hint + " TUNEBOARD_DATABASE_BUSY_TIMEOUT_SECONDS sets how long a write waits.",
    )


def write_lock_holders(path: Path) -> list[int]:
    """Pids that hold a write lock on the SQLite database at `path`, read from /proc/locks (Linux;
    empty elsewhere): the WAL write lock on its `-shm` file, or any write lock on the file itself
    (a rollback-journal writer)."""
    files: dict[tuple[int, int, int], bool] = {}
    for file, is_shm in ((path, False), (path.with_name(path.name + "-shm"), True)):
        with contextlib.suppress(OSError):
            st = file.stat()
            files[(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)] = is_shm
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    pids: list[int] = []
    for line in lines:
        # "1: POSIX  ADVISORY  WRITE 11893 fe:00:2148618 120 120"; a waiter's line has "->".
        fields = line.split()
        if len(fields) != 8 or fields[1] != "POSIX" or fields[3] != "WRITE":
            continue
        try:
            major, minor, inode = fields[5].split(":")
            key = (int(major, 16), int(minor, 16), int(inode))
            pid, start, end = int(fields[4]), int(fields[6]), fields[7]
        except ValueError:
            continue
        if key not in files:
            continue
        if files[key] and not (
            start <= WAL_WRITE_LOCK_BYTE and (end == "EOF" or int(end) >= WAL_WRITE_LOCK_BYTE)
        ):
            continue  # a reader's or checkpointer's lock on the -shm file
        if pid not in pids:
            pids.append(pid)
    return pids


def describe_process(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, UnicodeDecodeError):
        command = ""
    command = command.strip()
    if len(command) > 120:
        command = command[:117] + "..."
    who = f"this web server (process {pid})" if pid == os.getpid() else f"process {pid}"
    return f"{who}: `{command}`" if command else who


# --- read-only ----------------------------------------------------------------------------------


def read_only(path: Path) -> DatabaseReadOnly:
    found = read_only_reason(path)
    reason, hint = found or (
        "SQLite opened it read-only",
        f"Make {path} and its folder writable by the user running Tuneboard (uid {os.getuid()}).",
    )
    return DatabaseReadOnly(f"The database {path} cannot be written: {reason}.", hint=hint)


def read_only_reason(path: Path) -> tuple[str, str] | None:
    """Why the database file (or its folder, where SQLite creates `-wal` and `-shm`) cannot be
    written, with what to do, or None when nothing is found. Permission bits are checked last:
    root ignores them, but not a read-only mount or an immutable file."""
    for target in (path, path.parent):
        if not target.exists():
            continue
        if os.statvfs(target).f_flag & os.ST_RDONLY:
            mount = _mount_point(target)
            return (
                f"{target} lies on a read-only mount ({mount})",
                f"Remount it read-write (`mount -o remount,rw {mount}`), or move the data dir to a "
                "writable disk.",
            )
        if _immutable(target):
            return (
                f"{target} is marked immutable",
                f"Clear the flag: `chattr -i {target}`.",
            )
        if not os.access(target, os.W_OK):
            st = target.stat()
            return (
                f"the user running Tuneboard (uid {os.getuid()}) may not write {target} "
                f"(mode {st.st_mode & 0o777:o}, owner uid {st.st_uid})",
                f"Give that user write access to {target} (e.g. `chown {os.getuid()} {target}` or "
                f"`chmod u+w {target}`); SQLite also writes `-wal` and `-shm` files in its folder.",
            )
    return None


def _mount_point(path: Path) -> Path:
    """The mount `path` lies on: the longest mount point above it in /proc/self/mounts (a bind
    mount shares its device with its parent, so comparing devices would miss it)."""
    path = path.resolve()
    best = Path("/")
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) < 2:
                continue
            mount = Path(fields[1].replace("\\040", " "))
            if path.is_relative_to(mount) and len(mount.parts) > len(best.parts):
                best = mount
    return best


def _immutable(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        flags = fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8))
        return bool(struct.unpack("i", flags[:4])[0] & FS_IMMUTABLE_FL)
    except OSError:
        return False  # the filesystem has no such flags (tmpfs, overlay)
    finally:
        os.close(fd)
