"""Build small BIDS layouts in a temporary folder (no voxel data needed for discovery tests)."""
from __future__ import annotations

import json
from pathlib import Path


def make_dataset(root: Path, files: list[str] | dict[str, object], name: str = "test",
                 description: dict | None = None) -> Path:
    """Create ``root`` with a dataset_description.json and the given files.

    ``files`` maps relative paths to content: a dict is written as JSON, bytes/str as is,
    None as an empty file. A list means empty files.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    desc = {"Name": name, "BIDSVersion": "1.10.0", "DatasetType": "raw"}
    desc.update(description or {})
    (root / "dataset_description.json").write_text(json.dumps(desc))
    items = files.items() if isinstance(files, dict) else ((f, None) for f in files)
    for rel, content in items:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict):
            path.write_text(json.dumps(content))
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(b"")
    return root
