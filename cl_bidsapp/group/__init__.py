"""Group level: tables, QC flags, evaluation, template-space lesion frequency map, report.

The command line calls :func:`run_group_level` for the ``group`` analysis level; it reads the
participant level's derivatives only. See ``docs/group.md``.
"""
from cl_bidsapp.group.run import run_group_level

__all__ = ["run_group_level"]
