"""One settings object for a run, saved as TOML with every run so it can be reproduced.

The command line builds a :class:`Settings`; everything downstream receives it explicitly
(no module-level global state, so tests build settings directly).

>>> s = Settings(bids_dir=Path("/data/bids"), output_dir=Path("/data/out"))
>>> s.run_id  # doctest: +SKIP
'20261126-163000_3f2a...'
>>> text = s.to_toml()
>>> Settings.from_toml(text).output_dir
PosixPath('/data/out')
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import tomli_w

from cl_bidsapp import __version__


def _new_run_id() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}_{uuid.uuid4().hex[:8]}"


def _section(name: str, default: Any = None, factory=None):
    kwargs = {"metadata": {"section": name}}
    if factory is not None:
        kwargs["default_factory"] = factory
    else:
        kwargs["default"] = default
    return field(**kwargs)


@dataclass
class Settings:
    """Everything that determines what a run does.

    Fields are grouped into TOML sections through their ``section`` metadata.
    """

    # -- inputs ------------------------------------------------------------------------
    bids_dir: Path = _section("inputs", Path("."))
    output_dir: Path = _section("inputs", Path("."))
    analysis_levels: list[str] = _section("inputs", factory=lambda: ["participant"])
    participant_label: list[str] | None = _section("inputs")
    session_label: list[str] | None = _section("inputs")
    bids_filters: dict | None = _section("inputs")
    bids_filter_file: Path | None = _section("inputs")
    skip_bids_validation: bool = _section("inputs", False)
    bids_database_dir: Path | None = _section("inputs")
    derivatives: dict[str, Path] = _section("inputs", factory=dict)
    reference_masks: Path | None = _section("inputs")

    # -- execution ---------------------------------------------------------------------
    work_dir: Path | None = _section("execution")
    nprocs: int | None = _section("execution")
    omp_nthreads: int | None = _section("execution")
    mem_gb: float | None = _section("execution")
    use_plugin: Path | None = _section("execution")
    resource_monitor: bool = _section("execution", False)
    stop_on_first_crash: bool = _section("execution", False)
    reports_only: bool = _section("execution", False)
    boilerplate_only: bool = _section("execution", False)
    dry_run: bool = _section("execution", False)
    verbosity: int = _section("execution", 0)
    notrack: bool = _section("execution", False)
    run_id: str = _section("execution", factory=_new_run_id)
    version: str = _section("execution", __version__)

    # -- segmentation --------------------------------------------------------------------
    model: str | None = _section("segmentation")
    models_dir: Path | None = _section("segmentation")
    device: str = _section("segmentation", "auto")
    folds: list[int] | None = _section("segmentation")
    tta: bool = _section("segmentation", True)
    tile_step_size: float = _section("segmentation", 0.5)
    threshold: float | None = _section("segmentation")
    min_lesion_size: str | None = _section("segmentation")
    skull_strip: str = _section("segmentation", "auto")
    skull_strip_tool: str = _section("segmentation", "deepbet")

    # ---------------------------------------------------------------------------------
    @property
    def levels(self) -> set[str]:
        return set(self.analysis_levels)

    def effective_work_dir(self) -> Path:
        """``--work-dir``, else ``./work`` in the current directory (as fMRIPrep does)."""
        return self.work_dir if self.work_dir is not None else Path.cwd() / "work"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Sections of TOML-ready values (None dropped, paths as strings)."""
        out: dict[str, dict[str, Any]] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "bids_filters" and value is not None:
                # JSON text: a filter's null ("this entity absent") has no TOML form
                value = json.dumps(value, sort_keys=True)
            value = _to_plain(value)
            if value is None:
                continue
            out.setdefault(f.metadata["section"], {})[f.name] = value
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, sections: dict[str, dict[str, Any]]) -> "Settings":
        types = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for section in sections.values():
            if not isinstance(section, dict):
                continue
            for key, value in section.items():
                if key not in types:
                    raise KeyError(key)
                kwargs[key] = _from_plain(types[key], value)
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, text: str) -> "Settings":
        return cls.from_dict(tomllib.loads(text))


def _to_plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


_PATH_FIELDS = {
    "bids_dir", "output_dir", "bids_filter_file", "bids_database_dir", "reference_masks",
    "work_dir", "use_plugin", "models_dir",
}


def _from_plain(f: dataclasses.Field, value: Any) -> Any:
    if f.name in _PATH_FIELDS and value is not None:
        return Path(value)
    if f.name == "derivatives":
        return {k: Path(v) for k, v in value.items()}
    if f.name == "bids_filters" and isinstance(value, str):
        return json.loads(value)
    return value
