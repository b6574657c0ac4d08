"""Shared test set-up: one intra-op thread per pytest-xdist worker (two workers share two cores);
the `full_disk` fixture (a full disk for every file Python opens for writing)."""
import builtins
import errno
import io
import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


class FullFile(io.RawIOBase):
    """A file opened for writing on a full disk: every write fails with ENOSPC."""

    def __init__(self, f) -> None:
        self._f = f

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()
        super().close()


@pytest.fixture
def full_disk(monkeypatch):
    """Every file opened for writing (builtins.open) refuses its bytes with ENOSPC."""
    real_open = builtins.open

    def open_full(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if not any(m in mode for m in "wax"):
            return f
        raw = FullFile(f)
        return raw if "b" in mode else io.TextIOWrapper(io.BufferedWriter(raw), write_through=True)
    monkeypatch.setattr(builtins, "open", open_full)
