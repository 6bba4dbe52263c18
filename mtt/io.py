"""Atomic file writes (a crash mid-write leaves the previous file, never half of a new one), output folders
checked before work starts (and kept on Google Drive on Colab), and a quick check that a download's host can be
reached."""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import socket
import tempfile
import threading
import time
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temporary file beside `path`, fsync it, then rename over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _write_failed(path, err) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o644)  # mkstemp makes owner-only files; results are meant to be shared
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:  # safetensors raises its own error for the system's
        raise _write_failed(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_failed(path: Path, err: Exception) -> OSError:
    """One line naming the file that could not be written, and, for a full disk, what to do."""
    full = getattr(err, "errno", None) == errno.ENOSPC or "StorageFull" in str(err) or "No space left" in str(err)
    if full:
        return OSError(f"cannot write {path}: no space left on the device. Free some, then run the command again "
                       f"(a distillation: with --resume); what was written before is intact")
    return OSError(f"cannot write {path}: {getattr(err, 'strerror', None) or err}")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike, remedy: str) -> Any:
    """A JSON file of ours, or a ValueError naming it and saying what to do (`remedy`) when it is damaged."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is damaged, not valid JSON ({err}): {remedy}") from None


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> Path:
    # safetensors refuses non-contiguous tensors and tensors that share memory
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file; a missing or corrupt file gets a clear error."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from None


def load_plain_torch_file(path: str | os.PathLike, mmap: bool = False) -> Any:
    """What a torch.save file holds, when that is tensors and plain containers (lists, dicts) only: torch's
    weights_only unpickler refuses anything that could run code. A missing or unreadable file raises OSError; a
    file of other objects, or one that is no torch.save file at all, a ValueError that says which."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except (PermissionError, IsADirectoryError):
        raise  # unreadable: the system's own message says why (a truncated file's mmap fails with EINVAL: below)
    except pickle.UnpicklingError as err:
        if found := re.search(r"GLOBAL (\S+)", str(err)):  # torch's words for a class or function to import
            raise ValueError(f"refusing to load {path}: it needs arbitrary code to unpickle ({found[1]}); mtt reads "
                             ".pt files of tensors and lists only, as the original MTT code writes them") from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
        raise ValueError(f"{path} is truncated or corrupt, or no torch.save file "
                         f"({reason[1] if reason else 'not a pickle of tensors'})") from None
    except Exception as err:  # bytes that are no pickle end in RuntimeError, EOFError, IndexError ...
        raise ValueError(f"{path} is truncated or corrupt, or no torch.save file "
                         f"({type(err).__name__}: {err})") from None


def ensure_writable_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create `path` if needed and prove it writable now, before any long work is spent on it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is an existing file, not a folder: choose another {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{flag} {path} is not writable ({err.strerror or err}): choose another {flag}") from None
    return path


COLAB_DRIVE = Path("/content/drive")  # where Colab mounts Google Drive


def on_drive(path: str | os.PathLike) -> Path:
    """Where to keep `path` so that it outlives the runtime: on Colab, MyDrive/mtt/PATH on Google Drive (mounted here,
    which asks for access, if it is not yet), since a runtime that disconnects or times out takes /content and the
    hours of experts and distillation in it; elsewhere, and for an absolute path, `path` itself."""
    path = Path(path)
    if path.is_absolute():
        return path
    try:
        from google.colab import drive
    except ImportError:  # not on Colab
        return path
    if not (COLAB_DRIVE / "MyDrive").is_dir():
        drive.mount(str(COLAB_DRIVE))
    return COLAB_DRIVE / "MyDrive" / "mtt" / path


LOCK = ".mtt.lock"  # "HOST PID" of the process writing into the folder
LOCK_BEAT_S = 30      # the holder touches its lock this often
LOCK_STALE_S = 300    # another machine's lock untouched this long is a killed run's: its holder beats no more


@contextmanager
def held_folder(path: str | os.PathLike) -> Iterator[Path]:
    """`path` (--out), writable and held by this process while the block runs: a second run into it at the same
    time (a job started twice) is refused, where it would write duplicate results. A killed run's lock is taken
    over (on this machine: its process is gone; from another, sharing the folder: it has not been touched for
    LOCK_STALE_S), and the hidden temporaries of its interrupted writes are removed. Holding it again in the same
    process (the command line holds what distill holds) is a no-op."""
    path = ensure_writable_dir(path)
    lock, owner = path / LOCK, f"{socket.gethostname()} {os.getpid()}"
    if _holder(lock)[:2] == tuple(owner.split()):
        yield path
        return
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            _refuse_if_held(lock)
            lock.unlink(missing_ok=True)  # a killed run's
    try:
        with os.fdopen(fd, "w") as f:
            f.write(owner)
    except OSError as err:  # an empty lock would keep every later run out for LOCK_STALE_S
        lock.unlink(missing_ok=True)
        raise _write_failed(lock, err) from None
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(lock, stop), name="mtt-lock", daemon=True)
    beat.start()
    try:
        _remove_stale_temporaries(path)
        yield path
    finally:
        stop.set()
        beat.join()
        try:
            lock.unlink()
        except FileNotFoundError:  # someone removed the folder (or emptied it) while this run wrote into it
            warnings.warn(f"{path} was removed or emptied while this run wrote into it: what was written there "
                          f"before then is lost, and another run could have started into it", RuntimeWarning)
        except OSError:  # the folder turned read-only: the error that ended the run is the one to see
            pass


def _beat(lock: Path, stop: threading.Event) -> None:
    while not stop.wait(LOCK_BEAT_S):
        try:
            os.utime(lock)
        except OSError:  # the folder went away: nothing left to hold
            return


def _holder(lock: Path) -> tuple[str, str, float]:
    """(host, pid, seconds since last touched) of a lock; '?' where it cannot be read (being written this instant,
    or damaged); age 0 when it is gone."""
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return "?", "?", 0.0
    try:
        host, pid = lock.read_text().split()
    except (OSError, ValueError):
        return "?", "?", age
    return host, pid, age


def _refuse_if_held(lock: Path) -> None:
    host, pid, age = _holder(lock)
    if host == socket.gethostname() and pid.isdigit():
        alive = _process_exists(int(pid))
    else:  # another machine's, or unreadable: alive while its holder keeps touching it
        alive = age < LOCK_STALE_S
    if alive:
        raise ValueError(f"{lock.parent} is being written by another run (process {pid} on {host}): let it "
                         f"finish, or use another --out. If no such run is going on, delete {lock} (a lock left "
                         f"on another machine is taken over once untouched for {LOCK_STALE_S // 60} minutes)")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete the hidden `.NAME.XXXX.tmp` files that a killed atomic_write leaves behind, in `folder` and its
    sub-folders (a run's snapshots/), except those another run holds; no other process writes into `folder`."""
    others = {sub for sub in folder.iterdir() if sub.is_dir() and (sub / LOCK).exists()}
    for p in [*folder.glob(".*.tmp"), *(p for p in folder.glob("*/.*.tmp") if p.parent not in others)]:
        if p.is_file():
            p.unlink(missing_ok=True)


def figure_format(path: str | os.PathLike) -> str:
    """The format a figure saved at `path` takes: the one its suffix names (.png, .pdf, .svg, ...; none: png)."""
    from matplotlib.backend_bases import FigureCanvasBase

    kind, kinds = Path(path).suffix.lstrip(".").lower() or "png", FigureCanvasBase.get_supported_filetypes()
    if kind not in kinds:
        raise ValueError(f"cannot save a figure as {path}: use one of {', '.join('.' + k for k in sorted(kinds))}")
    return kind


def atomic_save_figure(fig: Any, path: str | os.PathLike, dpi: int) -> Path:
    """Save a matplotlib figure atomically, in the format its suffix names (figure_format)."""
    kind = figure_format(path)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=kind, dpi=dpi))


def reachable(url: str, timeout: float = 3.0) -> bool:
    """A quick TCP check of `url`'s host, so that an offline machine fails in seconds instead of after retries.
    Behind a proxy the host is not reached directly: then the download's own timeouts decide."""
    u = urlparse(url)
    if u.scheme in urllib.request.getproxies():
        return True
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False
