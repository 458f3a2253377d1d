"""Checkpoint files: atomic writes, and loads that fail with one clear line.

A checkpoint is written to a temporary file in the same directory, fsynced, then renamed over
the previous one (and the directory fsynced): at every moment the path holds either the
previous complete checkpoint or the new complete one, also when the disk fills up or the
process is killed half-way through the write.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from qvpo.errors import ConfigError, one_line

FORMAT = "qvpo-checkpoint-1"


def atomic_save(obj: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **obj}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (e.g. ENOSPC) leaves the previous file alone
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load(path: Path) -> dict:
    """Load a checkpoint written by atomic_save; ConfigError naming the problem otherwise.

    The file is unpickled (weights_only=False): load only checkpoints you wrote yourself.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = one_line(e)
        raise ConfigError(f"checkpoint {str(path)!r} is corrupt or truncated ({first[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{str(path)!r} is not a qvpo training checkpoint (expected format {FORMAT!r})")
    return state
