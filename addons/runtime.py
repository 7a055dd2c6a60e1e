"""The state our addons share: the loaded config and the current snapshot.

One `Runtime` is created per proxy and handed to every addon of the bundle;
the addons hold a reference to it, not copies, so a new snapshot published by
the Docker view is seen by the next request at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import Config
from .snapshot import Snapshot


@dataclass
class Runtime:
    config: Config = field(default_factory=Config)
    snapshot: Snapshot = field(default_factory=Snapshot)
