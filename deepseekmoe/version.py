"""The package version (pyproject.toml's), importable without loading torch."""

__version__ = "0.1.0"
