"""Machine-readable BIDS interface of cl-bidsapp (data files only).

The JSON/TSV files beside this module are the single source of truth for input queries,
output path patterns, lesion-table columns and the Boutiques descriptor.
"""
from importlib import resources
from pathlib import Path


def spec_path(name: str) -> Path:
    """Return the path of a file shipped in ``bids_spec/``."""
    return Path(str(resources.files(__name__).joinpath(name)))
