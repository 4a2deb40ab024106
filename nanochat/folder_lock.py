"""
One live owner per output folder: <folder>/.run.lock names it (pid, host, start time, command). Used by every
training run (runs.prepare_run) and by scripts/import_nanochat.py, so two runs started at once into one folder
cannot both write there.

The lock appears whole (written to a temp file, then hard-linked into place: link fails if the name exists), so a
reader never sees half a lock. A lock whose pid is gone on this host is stale (a killed run) and is taken over; one
of another host cannot be checked and is refused like a live one, naming the file to remove if that run is gone.
A lock is released when its process exits (atexit, or the one-line error exit of install_error_handler); a
process that is killed leaves a stale lock behind.

Tests: .venv/bin/python -m pytest tests/test_runs.py -k lock
"""

import atexit
import json
import os
import socket
import sys
import time

from nanochat.common import UserError, on_error_exit, print0

LOCK_FILE = ".run.lock"


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


def _read_lock(path):
    """The owner recorded in a lock file ({} for an unreadable one), or None when there is no lock."""
    try:
        with open(path, encoding="utf-8") as f:
            owner = json.loads(f.read(4096))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _link_lock(path, owner):
    """Create the lock file with its whole content, only if none exists -> whether this call created it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(owner, f)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: exclusive create (a reader may see it empty for a moment)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(owner, f)
        return True
    finally:
        os.remove(tmp)


def lock_output_folder(directory):
    """Own `directory` for this process until it exits: creates <directory>/.run.lock. A lock held by another live
    process is a UserError naming it (pid, host, start, command); a stale lock (its pid gone, same host) is taken
    over; a lock of this very process is kept. Returns the lock's path (released by release_output_folder, which
    runs at exit)."""
    path = os.path.join(directory, LOCK_FILE)
    host = socket.gethostname()
    mine = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300]}
    for _ in range(10):  # each pass either takes the lock, refuses, or saw it change under its feet
        os.makedirs(directory, exist_ok=True)
        if _link_lock(path, mine):
            atexit.register(release_output_folder, path)
            on_error_exit(lambda: release_output_folder(path))  # the one-line error exit skips atexit
            return path
        owner = _read_lock(path)
        if owner is None:
            continue  # released between our attempt and the read
        pid, owner_host = owner.get("pid"), owner.get("host")
        if owner_host == host and pid == os.getpid():
            return path
        if owner and (owner_host != host or not isinstance(pid, int) or _pid_alive(pid)):
            raise UserError(f"output folder {directory} is in use by another run: pid {pid} on {owner_host}, started "
                            f"{owner.get('started')} ({owner.get('command')}); wait for it to end or write elsewhere "
                            f"(output_tag = <another name>); if that run is gone, remove {path}")
        stale = f"{path}.stale.{os.getpid()}"  # take over: move it aside, check it is the one we judged stale
        try:
            os.rename(path, stale)
        except FileNotFoundError:
            continue
        if _read_lock(stale) != owner:  # a new owner locked in between: put its lock back
            try:
                os.link(stale, path)
            except FileExistsError:
                pass
            os.remove(stale)
            continue
        os.remove(stale)
        print0(f"{directory}: taking over the lock of a run that is gone (pid {pid} on {owner_host}, started "
               f"{owner.get('started')})")
    raise UserError(f"could not lock output folder {directory}: its lock {path} kept changing; retry")


def release_output_folder(lock_path):
    """Remove a lock taken by lock_output_folder, if it is still this process's."""
    owner = _read_lock(lock_path)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        try:
            os.remove(lock_path)
        except FileNotFoundError:
            pass
