"""Shared code of the SEM defect classification notebooks (import-time side-effect free)."""
