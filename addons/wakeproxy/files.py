"""Files the proxy writes for itself: atomically, readable by the owner only."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def blocked_for(path: Path | str, uid: int, gid: int, read: bool = True) -> Path | None:
    """The first folder on the way to `path` that `uid`:`gid` (no other groups) cannot pass, or `path` itself
    when that account cannot read it (`read`; a folder: list it) or, a folder, pass it (not `read`); None
    when it can."""
    p = Path(path).resolve()
    chain = [*reversed(p.parents), p]
    for i, part in enumerate(chain):
        try:
            st = os.stat(part)
        except OSError:
            return part
        shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
        bits = (st.st_mode >> shift) & 7
        is_dir = stat.S_ISDIR(st.st_mode)
        if i < len(chain) - 1:
            need = 1
        elif read:
            need = 5 if is_dir else 4
        else:
            need = 1 if is_dir else 0
        if uid != 0 and bits & need != need:
            return part
    return None

