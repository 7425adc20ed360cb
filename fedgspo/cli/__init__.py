"""The ``fedgspo`` command: operator actions, run-directory readers, lineage pictures, curves."""

from fedgspo.cli.main import main

__all__ = ["main"]
