"""Small file helpers shared by the CLI jobs."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from .errors import MobileInstError

if TYPE_CHECKING:
    import numpy as np
    import torch


def write_json(path: str | Path, obj: Any, indent: int | None = None) -> Path:
    """Write JSON atomically (temp file + rename): an interrupted write never leaves half a file,
    a failed one (`atomic_path`) is a MobileInstError naming the file and the errno."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """`data` written atomically at `path` (as `write_json`)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def write_image(path: str | Path, rgb: "np.ndarray", params: Sequence[int] = ()) -> Path:
    """An RGB uint8 image written atomically (`write_bytes`) in the format its suffix names;
    `params`: cv2.imwrite's (e.g. JPEG quality). cv2.imwrite returns False on a failure (a full
    disk) instead of raising, which went unnoticed (issue 23): here a failure is one
    MobileInstError naming the file (and the errno), and no half image is left under its name."""
    import cv2  # here, not at the top: most users of this module write no image
    path = Path(path)
    try:
        ok, encoded = cv2.imencode(path.suffix or ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                                   list(params))
    except cv2.error:  # an extension OpenCV has no encoder for
        ok = False
    if not ok:
        raise MobileInstError(f"{path}: could not be written: OpenCV cannot encode this format")
    return write_bytes(path, encoded.tobytes())


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[str]:
    """The name of a new temporary file beside `path`, to be written by the block; renamed over
    `path` when the block ends (after an fsync when `fsync`), removed when it fails. An OSError
    (a full disk, a read-only or vanished folder) becomes a MobileInstError naming `path` and the
    errno; `path` keeps its previous content and no temporary file is left."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file_beside(path)
        os.close(fd)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone already after the rename


def _fsync(name: str) -> None:
    fd = os.open(name, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_error(path: str | Path, e: OSError) -> MobileInstError:
    """One line for a failed write: the file, the reason and the errno name (ENOSPC, ...)."""
    return MobileInstError(f"{path}: could not be written: {os_reason(e)}")


def os_reason(e: OSError) -> str:
    """"No space left on device (ENOSPC)" for an OSError; its text when it has no errno."""
    code = errno.errorcode.get(e.errno or 0)
    return f"{e.strerror or e} ({code})" if code else str(e) or type(e).__name__


def temp_file_beside(path: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """(fd, name) of a new temporary file in `path`'s folder, to be renamed over `path` (atomic
    writes). It gets the mode a plain open() would leave: the mode of the file it replaces, or
    0666 & ~umask for a new one (mkstemp's own 0600 would hide exports from other users).
    suffix: how its name ends (".tmp.mp4" for a writer that picks the format from the name)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.fchmod(fd, plain_write_mode(path))
    return fd, tmp


def plain_write_mode(path: Path) -> int:
    """The mode a plain open() for writing leaves `path` with: its present mode, or 0666 & ~umask
    for a new file."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def replace_with(done: str | Path, path: str | Path) -> None:
    """A finished file `done`, written in `path`'s folder (same file system), renamed over `path`
    with the mode a plain write gives (`plain_write_mode`): atomic, so `path` is at every moment
    its old file or the whole new one. For converters that write files of their own choosing
    (pnnx): point them at a temporary folder beside `path`, never at /tmp, whence a move to
    another file system is a copy that a crash leaves half done under the final name."""
    path = Path(path)
    os.chmod(done, plain_write_mode(path))
    os.replace(done, path)


PROBE_BYTES = 1 << 20


def probe_write(folder: str | Path) -> OSError | None:
    """Why writes into `folder` fail, as the OS says it: the OSError of writing (and syncing)
    PROBE_BYTES to a temporary file there, which is removed; None when that works. For writers
    in C libraries that fail without an errno (OpenCV's VideoWriter on a full disk only logs
    "Failed to write frame"): call it before their partial file is removed, while the disk is
    still as they found it."""
    try:
        fd, name = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=folder)
    except OSError as e:
        return e
    try:
        os.close(fd)
        with open(name, "wb") as f:
            f.write(bytes(PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e
    finally:
        Path(name).unlink(missing_ok=True)
    return None


def current_umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed memory for reuse instead of returning it to the OS.

    By default every activation buffer above 128 KiB is mmap-ed and unmapped again, so each eager
    forward/backward page-faults its memory back in (glibc `mallopt(3)`: M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD); measured here, one CPU training step of the demo takes 1.2x-1.4x longer that
    way (docs/performance.md).
    This is the in-process form of MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>. The peak
    memory is unchanged; memory freed after the peak is kept by the process. Returns whether it
    applied (False off glibc, e.g. macOS or musl)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


DEVICE_CHOICES = "auto | cpu | cuda | cuda:N"


def resolve_device(name: str | None) -> "torch.device":
    """--device as every verb reads it: auto (CUDA when available, else CPU), cpu, cuda, cuda:N.
    An unknown name or a device this machine lacks is a MobileInstError, before any work."""
    import torch
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise MobileInstError(f"--device {name!r}: unknown device; choose {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        why = "this PyTorch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise MobileInstError(f"--device {name}: CUDA is not available ({why}); use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise MobileInstError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def check_output_file(path: str | Path, what: str = "output file",
                      inputs: dict[str, str | Path | None] | None = None) -> Path:
    """`path` can be written as a file: not a folder, not one of the command's `inputs` (option
    -> path: writing would replace it), its folder creatable and writable. MobileInstError before
    any work otherwise; nothing is created."""
    path = Path(path)
    if path.is_dir():
        raise MobileInstError(f"{path}: the {what} is an existing folder")
    check_not_input(path, what, inputs or {})
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise MobileInstError(f"{path}: the {what} cannot be created ({parent} is a file)")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise MobileInstError(f"{path}: the {what} is not writable")
    return path


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """`path` is, or can be made, a writable folder; MobileInstError before any work otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MobileInstError(f"{path}: the {what} is an existing file, not a folder")
    parent = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not parent.is_dir():
        raise MobileInstError(f"{path}: the {what} cannot be created ({parent} is a file)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MobileInstError(f"{path}: the {what} is not writable ({parent} is read-only)")
    return path


def check_not_input(path: str | Path, what: str, inputs: dict[str, str | Path | None]) -> None:
    """MobileInstError when the output `path` is one of the command's `inputs` (option -> path;
    None: not given), which writing it would replace."""
    for option, source in inputs.items():
        if source and same_file(path, source):
            raise MobileInstError(f"{path}: the {what} is the {option} file this command reads; "
                                  "writing it would replace it, so choose another path")


def same_file(a: str | Path, b: str | Path) -> bool:
    """Both paths name one existing file (also through links or another spelling)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


# Lock fds this process holds. flock belongs to the open file, which a fork shares: a data-loader
# worker forked while a run holds its lock would keep the run locked after the run is killed
# (until the orphan notices, seconds later). A forked child closes its copies at once.
_HELD_LOCKS: set[int] = set()


def _drop_locks_in_child() -> None:
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


def try_flock(fd: int) -> bool:
    """An exclusive non-blocking flock on fd, held by this process only (not by forked children);
    False if another holds it. OSError where the file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    _HELD_LOCKS.add(fd)
    return True


def close_lock(fd: int) -> None:
    """Release and close a `try_flock` fd."""
    _HELD_LOCKS.discard(fd)
    os.close(fd)  # the last reference to the open file: the lock goes with it


@contextlib.contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """An exclusive flock on the folder itself while a command writes into it (nothing is created
    there); a second command writing into it meanwhile gets a MobileInstError naming `what`. The
    kernel drops the lock when the process dies. Where the file system has no flock, no lock."""
    fd = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            locked = try_flock(fd)
        except OSError:
            locked = True  # no flock here: no lock
        if not locked:
            raise MobileInstError(f"{folder}: another command is writing into this {what}; wait "
                                  "for it or choose another one")
        yield
    finally:
        close_lock(fd)


# What mobileinst wrote into a folder the user named (`write_new_files`): relative paths, json.
WRITTEN_MANIFEST = ".mobileinst-files.json"
_STAGE_PREFIX = ".mobileinst-stage-"


def write_new_files(out: str | Path, write: Callable[[Path], Path], exist_ok: bool = False,
                    what: str = "output folder (--out)") -> Path:
    """Run `write(stage)` into a fresh hidden folder inside `out`, then move its files into `out`
    and record them in `out`/WRITTEN_MANIFEST; return write's path moved into `out`.

    A file of `out` that mobileinst did not write (not in the manifest) is never replaced or
    removed: `out` holding any is refused before any work unless `exist_ok`, and with `exist_ok`
    the files are moved only when none would replace one (else refused, nothing moved). `out` is
    locked meanwhile (`folder_lock`): a second command writing into it is refused."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # refusals below need an existing folder anyway
    with folder_lock(out, what):
        if not exist_ok:
            refuse_foreign_files(out, what, ", or add --exist-ok to write beside them (they are "
                                 "never replaced)")
        stage = Path(tempfile.mkdtemp(prefix=_STAGE_PREFIX, dir=out))
        try:
            result = write(stage)
            new = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if not p.is_dir())
            claim_files(out, new, what)
            for name in new:
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(stage / name, out / name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # our own staging folder only
    return out / result.relative_to(stage)


def refuse_foreign_files(out: Path, what: str, hint: str = "") -> None:
    """MobileInstError naming one file under `out` that mobileinst did not write (not in its
    WRITTEN_MANIFEST); `hint` ends the message (the verb's way around it)."""
    foreign = next(_foreign_files(out, written_files(out)), None)
    if foreign is not None:
        raise MobileInstError(f"{out}: the {what} holds files mobileinst did not write (e.g. "
                              f"{foreign}); choose a new or empty folder{hint}")


def claim_files(out: Path, names: list[str], what: str) -> None:
    """Record `names` (paths relative to `out`) in `out`/WRITTEN_MANIFEST before a command writes
    them; MobileInstError, nothing recorded, when one exists and mobileinst did not write it (or
    it is now a folder): writing would replace a user's file. Hold `folder_lock(out)` around it
    and the writes. The manifest is rewritten only when it gains names (a rerun writes nothing
    more, so a full disk fails on the outputs themselves, each named)."""
    owned = written_files(out)
    clash = [n for n in names if os.path.lexists(out / n) and (n not in owned or (out / n).is_dir())]
    if clash:
        raise MobileInstError(f"{out / clash[0]}: not written by mobileinst, and this command "
                              f"would replace it ({len(clash)} such file(s)); nothing was "
                              "written: choose another folder")
    _record(out, owned, names)


def _record(out: Path, owned: set[str], names: list[str]) -> None:
    """`names` added to `out`'s manifest (which held `owned`); no write when none is new."""
    if not owned.issuperset(names):
        write_json(out / WRITTEN_MANIFEST, sorted(owned | set(names)))


def _record_new_files(out: Path) -> None:
    """Every file under `out` recorded as mobileinst's (`owned_folder`'s end)."""
    owned = written_files(out)
    _record(out, owned, list(_foreign_files(out, owned)))


@contextlib.contextmanager
def claimed_files(out: Path, names: list[str], what: str) -> Iterator[Path]:
    """`out` created and locked (`folder_lock`) while the block writes `names` (relative paths)
    into it, each claimed first (`claim_files`: a user's file of that name is refused before any
    work, never replaced). For a command whose output names are known up front (`track`)."""
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, what):
        claim_files(out, names, what)
        yield out


@contextlib.contextmanager
def owned_folder(out: Path, what: str) -> Iterator[Path]:
    """For a command whose output names are not known up front (`benchmark --out`): `out` is
    created and locked (`folder_lock`), refused when it holds files mobileinst did not write,
    and every file in it when the block ends (also by an error) is recorded as mobileinst's, so a
    rerun may replace them. Its writes must be atomic (a kill leaves no half file)."""
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, what):
        refuse_foreign_files(out, what)
        try:
            yield out
        except BaseException:
            with contextlib.suppress(MobileInstError):  # the block's own error says more
                _record_new_files(out)
            raise
        _record_new_files(out)


def written_files(folder: Path) -> set[str]:
    """The relative paths `write_new_files` recorded writing into `folder` (none: empty)."""
    try:
        names = json.loads((folder / WRITTEN_MANIFEST).read_text())
    except (OSError, ValueError):
        return set()
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def _foreign_files(folder: Path, owned: set[str]) -> Iterator[str]:
    """Files (and links) under `folder` that are not in `owned`, lazily; folders do not count,
    nor the manifest or a killed run's staging folder."""
    for root, dirs, files in os.walk(folder):
        if Path(root) == folder:
            dirs[:] = [d for d in dirs if not d.startswith(_STAGE_PREFIX)]
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel not in owned and rel != WRITTEN_MANIFEST:
                yield rel


def check_range(option: str, value: float | int | None, low: float, high: float) -> None:
    """A numeric option in [low, high] (None = not given); MobileInstError naming it otherwise.
    NaN fails too."""
    import math
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and low <= value <= high):
        raise MobileInstError(f"{option} must be in [{low}, {high}], got {value!r}")


# Inference short side: the network needs 32 px (stride 32); above 4096 px the activations of one
# image outgrow the machines this targets (a 10000 px run failed after a minute).
IMGSZ_RANGE = (32, 4096)

# Random seeds: NumPy's legacy seeding (np.random.seed, RandomState) takes 0 .. 2**32 - 1 only.
SEED_RANGE = (0, 2**32 - 1)

# Peak resident memory of inference per input pixel, one image: `predict --imgsz 4096` (a
# 4096 x 5459 input) peaked at 4.7-5.5 GB (issue 23), about 250 bytes per pixel.
INFER_BYTES_PER_PIXEL = 250
# Training per input pixel of a batch (forward activations kept for the backward, gradients, the
# in-run evaluation): 800-930 bytes at batch 1 and --imgsz 1024-2048 (benchmarks/peak_rss.py),
# 1210-1370 at the default 640 x batch 16 (TopFormer-T 10.6 GB, the MobileNetV2 hard_cpu model
# 12.0 GB peak). The check takes the low end, so it refuses only runs that cannot fit.
TRAIN_BYTES_PER_PIXEL = 800


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(option: str, short: int, long: int, images: int = 1, what: str = "inference",
                 per_pixel: int = INFER_BYTES_PER_PIXEL) -> None:
    """MobileInstError before any work when `images` inputs of short x long pixels would need
    more memory than is available (`per_pixel` bytes each: INFER_BYTES_PER_PIXEL for inference,
    TRAIN_BYTES_PER_PIXEL for training)."""
    need, have = per_pixel * short * long * images, available_memory()
    if have is None or need <= have:
        return
    fits = int((have / images / per_pixel * 640 / 853) ** 0.5) // 32 * 32
    batch = f" x {images} images" if images > 1 else ""
    raise MobileInstError(
        f"{option} {short}: {what} at {short}x{long}{batch} needs about {need / 1e9:.1f} GB "
        f"(~{per_pixel} bytes per pixel), but only {have / 1e9:.1f} GB is available; "
        f"use {option} {max(fits, 32)} or less" + (" or a smaller batch" if images > 1 else ""))
