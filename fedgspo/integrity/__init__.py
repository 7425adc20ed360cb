"""Integrity: keys and authenticated updates, rollout proofs, the audit log, signed operator requests."""
