"""Atomic writes: a reader never sees a half-written file or directory, and a failed write
leaves what was stored before untouched."""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

import pandas as pd

log = logging.getLogger(__name__)


def process_gone(host: str | None, pid: int) -> bool:
    """True only when process `pid` of this host no longer exists. A process of another host (a
    shared file system, a tracking store shared by machines) cannot be checked: never gone."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:   # it exists, as another user
        pass
    return False


def owner_tag() -> str:
    """pid@host of this process: in a temp's name, what process_gone checks."""
    return f"{os.getpid()}@{socket.gethostname()}"


def remove_stale_temps(final: Path) -> None:
    """What a killed writer of `final` (SIGKILL, OOM, eviction) left beside it: its temporary is
    removed and an old copy it had moved aside is put back when the new one never took its place.
    Only when the owner named in the name is gone: a concurrent writer keeps its own, and so does
    a writer on another host or a temp without an owner in its name."""
    owned = re.compile(rf"\.{re.escape(final.name)}\.(tmp-[a-z0-9_]+|old)-(\d+)@(.+)")
    for path in sorted(final.parent.glob(f".{glob.escape(final.name)}.*")):
        m = owned.fullmatch(path.name)
        if not m or not process_gone(m[3], int(m[2])):
            continue
        if m[1] == "old" and not final.exists():
            os.replace(path, final)
            log.warning("restored %s from %s, left by process %s that is gone", final, path.name, m[2])
        else:
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s, left by process %s that is gone", path, m[2])


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto `final` (file or directory).
    The temporary's name carries its owner (pid@host) so a later write can clear what a killed one left."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    owner = owner_tag()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", suffix=f"-{owner}", dir=final.parent)) / final.name
    try:
        yield tmp
        if tmp.is_dir():
            old = None
            if final.exists():
                old = final.with_name(f".{final.name}.old-{owner}")
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def write_json(obj, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    return Path(path)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file below src into dst (copy across file systems)."""
    for dirpath, _, files in os.walk(src):
        target = Path(dst) / Path(dirpath).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            try:
                os.link(Path(dirpath) / f, target / f)
            except OSError:
                shutil.copy2(Path(dirpath) / f, target / f)


@contextlib.contextmanager
def exclusive(path: str | Path) -> Iterator[None]:
    """Hold the lock file beside `path` (.<name>.lock): one writer at a time across processes (two
    Dagster partition runs rewriting one sharded asset)."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock")):
        yield
