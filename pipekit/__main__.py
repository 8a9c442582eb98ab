"""``python -m pipekit``: the same as the ``pipekit`` command."""

from __future__ import annotations

if __name__ == "__main__":  # not when a process worker re-imports the main module
    import sys

    from pipekit.cli import main

    sys.exit(main())
