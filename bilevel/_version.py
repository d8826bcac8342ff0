"""The package version, written only here (pyproject.toml reads it; CHANGELOG.md records it)."""

__version__ = "0.2.1"
