"""Print requirements from pyproject.toml, one a line, for the container image builds.

    python3 deploy/pyproject-requirements.py deps  [PYPROJECT]   [project] dependencies
    python3 deploy/pyproject-requirements.py build [PYPROJECT]   [build-system] requires
    python3 deploy/pyproject-requirements.py test  [PYPROJECT]   the test extra, less the tools that do
                                                                 not run inside the test image

Used by scripts/image (to resolve wheels and key their cache), by the Dockerfile (the dependency layer)
and by deploy/test.Dockerfile, so that the three agree. Standard library only (Python 3.11+).
"""

import re
import sys
import tomllib

# Lint, type checking and the browser tests stay with scripts/test on the host.
NOT_IN_TEST_IMAGE = re.compile(r"^(ruff|mypy|types-.*|selenium)$", re.IGNORECASE)


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0]


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[1] not in ("deps", "build", "test"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    path = argv[2] if len(argv) == 3 else "pyproject.toml"
    with open(path, "rb") as f:
        data = tomllib.load(f)
    if argv[1] == "deps":
        reqs = data["project"].get("dependencies", [])
    elif argv[1] == "build":
        reqs = data.get("build-system", {}).get("requires", [])
    else:
        extra = data["project"].get("optional-dependencies", {}).get("test", [])
        reqs = [r for r in extra if not NOT_IN_TEST_IMAGE.match(_name(r))]
    for r in reqs:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
