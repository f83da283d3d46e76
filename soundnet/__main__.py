"""``python -m soundnet <group> ...``: the console commands, for environments where a short name is taken."""

from __future__ import annotations

import importlib
import sys

GROUPS = ("ingest", "student", "evaluate", "shards")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in GROUPS:
        sys.exit(f"usage: python -m soundnet {{{'|'.join(GROUPS)}}} COMMAND [ARGS]...")
    group = importlib.import_module(f"soundnet.{argv[0]}.cli")
    group.main(argv[1:], prog_name=f"python -m soundnet {argv[0]}")


if __name__ == "__main__":
    main()
