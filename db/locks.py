"""Per-org locks shared by every process on one app database.

PostgreSQL: a session-level advisory lock on a connection kept for the whole block, so the server
drops it when the process dies. SQLite (one machine by nature): flock on a file beside the
database, which the kernel drops when the process dies. In-memory SQLite: a thread lock, since
only this process can see the database anyway.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import text

from db.session import get_engine

_LOCAL_LOCKS: dict[tuple[int, int], threading.Lock] = {}


def _lock_dir() -> Path | None:
    database = get_engine().url.database
    if not database or database == ":memory:":
        return None
    folder = Path(database).resolve().parent / ".rrc-locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def org_lock(namespace: int, org_id: int, *, wait: bool) -> Iterator[bool]:
    """Hold the exclusive lock `namespace` of one org; yields False at once if busy and `wait` is false."""
    engine = get_engine()
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            args = {"ns": namespace, "org": org_id}
            if wait:
                conn.execute(text("SELECT pg_advisory_lock(:ns, :org)"), args)
                got = True
            else:
                got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:ns, :org)"), args).scalar())
            conn.commit()
            try:
                yield got
            finally:
                if got:
                    with contextlib.suppress(Exception):  # a broken connection has released it already
                        conn.execute(text("SELECT pg_advisory_unlock(:ns, :org)"), args)
                        conn.commit()
        return
    folder = _lock_dir()
    if folder is None:
        lock = _LOCAL_LOCKS.setdefault((namespace, org_id), threading.Lock())
        got = lock.acquire(blocking=wait)
        try:
            yield got
        finally:
            if got:
                lock.release()
        return
    fd = os.open(folder / f"{namespace:x}-{org_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            got = True
        except BlockingIOError:
            got = False
        yield got
    finally:
        os.close(fd)  # closing the descriptor releases the flock
