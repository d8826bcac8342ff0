"""``python -m applications.imaml``: see :mod:`applications.imaml.cli`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
