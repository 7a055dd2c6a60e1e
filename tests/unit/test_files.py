"""wakeproxy.files: can another account reach a path (the workers' state folder, the debug UI's files)?"""

from __future__ import annotations

import os
from pathlib import Path

from wakeproxy.files import blocked_for

NOBODY = 65534


def test_what_another_account_may_pass_and_read(tmp_path: Path) -> None:
    base = tmp_path / "base"
    inner = base / "inner"
    inner.mkdir(parents=True)
    f = inner / "page.html"
    f.write_text("x")
    for p in (tmp_path, base, inner):
        os.chmod(p, 0o755)
    os.chmod(f, 0o644)
    assert blocked_for(f, NOBODY, NOBODY) is None
    os.chmod(f, 0o600)  # not readable by others …
    assert blocked_for(f, NOBODY, NOBODY) == f.resolve()
    assert blocked_for(f, NOBODY, NOBODY, read=False) is None  # … though the way there is open
    os.chmod(base, 0o700)  # a folder on the way closed to others
    assert blocked_for(f, NOBODY, NOBODY, read=False) == base.resolve()
    os.chown(base, 0, NOBODY)
    os.chmod(base, 0o710)  # … open to its group: the account's own group passes
    assert blocked_for(inner, NOBODY, NOBODY, read=False) is None
    assert blocked_for(tmp_path / "missing", NOBODY, NOBODY) == (tmp_path / "missing").resolve()
    assert blocked_for(f, 0, 0) is None  # root passes everywhere
