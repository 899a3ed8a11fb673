"""What a killed kvdist process leaves behind, and its removal by a later one.

A process killed with SIGKILL (or a job whose rank 0 was stuck when the launcher ended it)
runs no cleanup: its shared-memory segment file or the demo's temporary cache stays. Such
names carry their creator's pid; a later process removes those whose creator is gone and
that are old enough (a creator in another pid namespace looks gone from here: the age keeps
its live files).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable

STALE_AFTER_S = 3600.0
"""Age (seconds since last modified) past which a file whose creator is gone is stale."""


def remove_left_behind(
    directory: str,
    name: re.Pattern[str],
    *,
    min_age_s: float = STALE_AFTER_S,
    remove: Callable[[str], object] = os.unlink,
    depth: int = 0,
) -> list[str]:
    """Remove the entries of `directory` whose name matches `name` (its first group is the
    creator's pid), whose creator is gone and that are older than `min_age_s`: the newest
    modification of the entry and, for a directory, of what lies up to `depth` levels
    inside it. Returns the paths removed; errors are ignored (another process may remove
    the same entry)."""
    removed: list[str] = []
    now = time.time()
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for entry in names:
        m = name.fullmatch(entry)
        if m is None or creator_alive(int(m.group(1))):
            continue
        path = os.path.join(directory, entry)
        try:
            if now - newest_mtime(path, depth) < min_age_s:
                continue
            remove(path)
        except OSError:
            continue
        removed.append(path)
    return removed


def newest_mtime(path: str, depth: int) -> float:
    """The latest modification time of `path` and of the entries up to `depth` levels
    inside it (a directory's own time changes only when its direct entries do)."""
    newest = os.lstat(path).st_mtime
    if depth > 0 and os.path.isdir(path) and not os.path.islink(path):
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    newest = max(newest, newest_mtime(entry.path, depth - 1))
                except FileNotFoundError:  # removed meanwhile
                    continue
    return newest


def creator_alive(pid: int) -> bool:
    """False only when no process has this pid; another user's, or not a pid: True."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True
    return True
