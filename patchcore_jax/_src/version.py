"""The library's version (one place; model files and exports record it)."""

__version__ = "0.2.0"
