"""Input discovery: from a BIDS layout to a list of work items.

A work item is one anatomical image to segment (MP2RAGE UNI or MPRAGE T1w) with its companions
(MP2RAGE inversions, T1 map) and the rule that classified it. The queries and rules live in
``bids_spec/inputs.json``; a ``--bids-filter-file`` overrides any query by name.

Classification, in order:

1. ``UNIT1`` images (query ``uni``) are MP2RAGE UNI.
2. Images a filter file puts in the optional ``mprage`` query are MPRAGE.
3. ``T1w`` images (query ``t1w``) go through ``t1w_rules`` of inputs.json: ``acq-`` label, sidecar
   evidence, an ``inv-2``/``inv-1`` MP2RAGE or a ``T1map`` in the same session (UNI exported as
   T1w, as dcm2niix-based OpenNeuro datasets do), else MPRAGE.
4. Sessions with complex (magnitude + phase) inversions but no UNI or T1w get a UNI computed from
   the inversions.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids_spec import spec_path
from cl_bidsapp.bids.entities import LONG_TO_SHORT, SHORT_TO_LONG, parse_name, read_metadata
from cl_bidsapp.errors import InputDataError, MissingInputError, NoFilesSelected, UsageError

LOGGER = logging.getLogger(__name__)

_ANY = "*"


@dataclass
class WorkItem:
    """One image to segment, with everything needed to process and name it."""

    subject: str
    session: str | None
    contrast: str  # "MP2RAGE" or "MPRAGE"
    image: Path | None  # the UNI / T1w image; None when UNI is computed from the inversions
    rule: str
    explain: str
    inv1: Path | None = None
    inv2: Path | None = None
    inv1_phase: Path | None = None
    inv2_phase: Path | None = None
    t1map: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    inv1_metadata: dict[str, Any] = field(default_factory=dict)
    inv2_metadata: dict[str, Any] = field(default_factory=dict)
    entities: dict[str, str] = field(default_factory=dict)  # short keys, for output names
    source_suffix: str = "T1w"
    problem: str | None = None  # why this image cannot be processed (reported as a failure)

    @property
    def bids_name(self) -> str:
        """Identifier used in tables and logs (the source name without extension)."""
        pairs = [f"{k}-{v}" for k, v in self.entities.items()]
        return "_".join(pairs + [self.source_suffix])

    @property
    def companions(self) -> str:
        names = [n for n, p in (("INV1", self.inv1), ("INV2", self.inv2), ("T1map", self.t1map))
                 if p is not None]
        return "+".join(names) if names else "-"

    def to_dict(self) -> dict[str, Any]:
        out = {
            "subject": self.subject, "session": self.session, "contrast": self.contrast,
            "bids_name": self.bids_name, "rule": self.rule, "explain": self.explain,
        }
        for key in ("image", "inv1", "inv2", "inv1_phase", "inv2_phase", "t1map"):
            value = getattr(self, key)
            out[key] = None if value is None else str(value)
        return out


def load_spec() -> dict[str, Any]:
    """The input queries and rules shipped in ``bids_spec/inputs.json``."""
    return json.loads(spec_path("inputs.json").read_text())


# -- filters ------------------------------------------------------------------------------

def read_filter_file(path: Path) -> dict[str, dict[str, Any]]:
    """Parse a ``--bids-filter-file`` (JSON ``{query: {entity: value}}``)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError("the BIDS filter file does not exist", path=path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"the BIDS filter file is not valid JSON ({exc})", path=path,
                         hint='expected e.g. {"t1w": {"acquisition": "mprage"}}') from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UsageError("the BIDS filter file must map query names to objects of entities",
                         path=path, hint='expected e.g. {"t1w": {"acquisition": "mprage"}}')
    return data


def check_filters(filters: dict[str, dict[str, Any]], valid_entities: set[str],
                  source: str | None = None) -> dict[str, dict[str, Any]]:
    """Validate query names and entity names; return filters with long entity names."""
    spec = load_spec()
    known_queries = set(spec["queries"]) | set(spec.get("optional_queries", {}))
    out: dict[str, dict[str, Any]] = {}
    for query, entities in filters.items():
        if query not in known_queries:
            raise UsageError(f"unknown query '{query}' in the BIDS filter file", path=source,
                             hint=f"known queries: {', '.join(sorted(known_queries))}")
        out[query] = {}
        for name, value in entities.items():
            long = SHORT_TO_LONG.get(name, name)
            if long not in valid_entities:
                raise UsageError(
                    f"unknown BIDS entity '{name}' in query '{query}'", path=source,
                    hint=f"known entities: {', '.join(sorted(valid_entities))}")
            out[query][long] = value
    return out


def _to_pybids(filters: dict[str, Any]) -> dict[str, Any]:
    from bids.layout import Query

    out = {}
    for key, value in filters.items():
        if value is None:
            out[key] = Query.NONE
        elif value == _ANY:
            out[key] = Query.REQUIRED
        else:
            out[key] = value
    return out


# -- discovery ------------------------------------------------------------------------------

class _File:
    """A file of the index: path and pybids-style entities (parsed once, cheap to read).

    Reading ``BIDSFile.entities`` goes through SQLAlchemy on every access; on 10,000 files the
    companion lookups spent most of their time there.
    """

    __slots__ = ("path", "entities")

    def __init__(self, path: str):
        self.path = path
        parsed = parse_name(Path(path).name)
        self.entities = {SHORT_TO_LONG.get(k, k): v for k, v in parsed.items()}


#: Entities matched on the file name here, not by pybids: pybids searches its patterns in the
#: whole absolute path, so a dataset stored below a folder named like ``sub-x`` or ``ses-x``
#: (``/data/ses-2024/study``, or ``cl-bidsapp .. out`` run inside ``sub-01/``) would give
#: every file that folder's label.
_NAME_ENTITIES = ("subject", "session")


def _name_matches(value: str | None, wanted: Any) -> bool:
    """Whether a file-name entity ``value`` satisfies a query value (filter-file semantics).

    >>> _name_matches("01", ["01", "02"]), _name_matches(None, None), _name_matches("1", "*")
    (True, True, True)
    >>> _name_matches("03", "01"), _name_matches(None, "*")
    (False, False)
    """
    if wanted is None:
        return value is None
    if wanted == _ANY:
        return value is not None
    if isinstance(wanted, (list, tuple, set)):
        return value is not None and value in {str(w) for w in wanted}
    return value == str(wanted)


class _Index:
    """Files of the queries, grouped by (subject, session) for companion lookups."""

    def __init__(self, layout, queries: dict[str, dict[str, Any]], subjects, sessions):
        self.by_query: dict[str, list[_File]] = {}
        self.by_session: dict[tuple[str, str, str | None], list[_File]] = {}
        base = {}
        if subjects:
            base["subject"] = subjects
        if sessions:
            base["session"] = sessions
        for name, query in queries.items():
            q = dict(query)
            q.update({k: v for k, v in base.items() if k not in q})
            by_name = {k: q.pop(k) for k in _NAME_ENTITIES if k in q}
            files = [_File(p) for p in sorted(layout.get(return_type="filename",
                                                         **_to_pybids(q)))]
            files = [f for f in files
                     if all(_name_matches(f.entities.get(k), v) for k, v in by_name.items())]
            self.by_query[name] = files
            for f in files:
                key = (name, f.entities.get("subject"), f.entities.get("session"))
                self.by_session.setdefault(key, []).append(f)

    def files(self, query: str) -> list[_File]:
        return self.by_query.get(query, [])

    def in_session(self, query: str, subject: str, session: str | None) -> list[_File]:
        return self.by_session.get((query, subject, session), [])


def _companion(candidates: list, image_entities: dict, spec: dict, part: str | None = "mag"):
    """Pick the best companion among same-session candidates (None if none fits)."""
    if not candidates:
        return None
    comp = spec["companions"]
    prefer = comp["prefer_equal"]

    def score(f):
        ents = f.entities
        mismatch = sum(1 for k in prefer if k in ents and k in image_entities
                       and ents[k] != image_entities[k])
        # an inversion named for another acquisition/run than the image is a worse match
        extra = sum(1 for k in prefer if k in ents and k not in image_entities)
        echo = int(ents.get("echo", 0) or 0)
        return (mismatch, extra, echo, f.path)

    wanted_parts = [part, None] if part else [None]
    pool = [f for f in candidates if f.entities.get("part") in wanted_parts]
    if not pool:
        return None
    best = sorted(pool, key=score)
    return best[0]


def _phase(candidates: list, magnitude) -> Path | None:
    if magnitude is None:
        return None
    target = {k: v for k, v in magnitude.entities.items() if k not in ("part",)}
    for f in candidates:
        ents = {k: v for k, v in f.entities.items() if k not in ("part",)}
        if f.entities.get("part") == "phase" and ents == target:
            return Path(f.path)
    return None


def _image_entities(f) -> tuple[dict[str, str], str]:
    parsed = parse_name(Path(f.path).name)
    suffix = parsed.pop("suffix", "T1w")
    parsed.pop("extension", None)
    return parsed, suffix


def _classify_t1w(f, index: _Index, spec: dict, root: Path) -> tuple[str, str, str]:
    ents = f.entities
    subject, session = ents.get("subject"), ents.get("session")
    metadata = None
    for rule in spec["t1w_rules"]:
        if "entity" in rule:
            value = ents.get(rule["entity"])
            if value is not None and re.search(rule["pattern"], str(value)):
                return rule["contrast"], rule["name"], rule["explain"]
        elif "metadata" in rule:
            if metadata is None:
                metadata = _metadata(Path(f.path), root)
            keys = rule["metadata"] if isinstance(rule["metadata"], list) else [rule["metadata"]]
            for key in keys:
                if key not in metadata:
                    continue
                if rule["pattern"] is None:
                    return rule["contrast"], rule["name"], rule["explain"]
                values = metadata[key] if isinstance(metadata[key], list) else [metadata[key]]
                if any(re.search(rule["pattern"], str(v)) for v in values):
                    return rule["contrast"], rule["name"], rule["explain"]
        elif "sibling" in rule:
            if index.in_session(rule["sibling"], subject, session):
                return rule["contrast"], rule["name"], rule["explain"]
        else:
            return rule["contrast"], rule["name"], rule["explain"]
    return "MPRAGE", "default", "a T1w image"


def discover(layout, participant_label: list[str] | None = None,
             session_label: list[str] | None = None,
             filters: dict[str, dict[str, Any]] | None = None) -> list[WorkItem]:
    """Plan the work: one :class:`WorkItem` per image to segment, sorted by subject/session/name.

    ``filters`` must already be checked with :func:`check_filters` (long entity names).
    """
    spec = load_spec()
    root = Path(layout.root)
    queries = {k: dict(v) for k, v in spec["queries"].items()}
    for name, extra in (filters or {}).items():
        queries.setdefault(name, {"datatype": "anat", "extension": [".nii.gz", ".nii"]})
        queries[name].update(extra)
    index = _Index(layout, queries, participant_label, session_label)

    items: list[WorkItem] = []
    claimed: set[str] = set()

    def add(f, contrast, rule, explain):
        ents = f.entities
        subject, session = ents.get("subject"), ents.get("session")
        entities, suffix = _image_entities(f)
        item = WorkItem(subject=subject, session=session, contrast=contrast, image=Path(f.path),
                        rule=rule, explain=explain, entities=entities, source_suffix=suffix)
        if contrast == "MP2RAGE":
            _attach_inversions(item, ents, index, spec)
        claimed.add(f.path)
        items.append(item)

    for f in index.files("uni"):
        add(f, "MP2RAGE", "UNIT1", "a UNIT1 image (MP2RAGE UNI)")
    for f in index.files("mprage"):
        if f.path not in claimed:
            add(f, "MPRAGE", "filter-file", "the filter file's 'mprage' query selected it")
    for f in index.files("t1w"):
        if f.path in claimed:
            continue
        try:
            contrast, rule, explain = _classify_t1w(f, index, spec, root)
        except InputDataError as exc:  # a broken sidecar fails this image only
            add(f, "MPRAGE", "unreadable-sidecar", "its sidecar cannot be read")
            items[-1].problem = str(exc)
            continue
        add(f, contrast, rule, explain)

    items.extend(_computed_uni_items(index, spec, items))
    for item in items:
        source = item.image if item.image is not None else item.inv2
        try:
            item.metadata = _metadata(source, root)
            item.inv1_metadata = _metadata(item.inv1, root)
            item.inv2_metadata = _metadata(item.inv2, root)
        except InputDataError as exc:
            item.problem = item.problem or str(exc)
    items.sort(key=lambda it: (it.subject, it.session or "", it.bids_name))
    from cl_bidsapp.bids.checks import mark_name_clashes

    mark_name_clashes(items)
    return items


def _metadata(path: Path | None, root: Path) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        return read_metadata(path, root)
    except ValueError as exc:
        raise InputDataError(str(exc)) from None


def _attach_inversions(item: WorkItem, ents: dict, index: _Index, spec: dict) -> None:
    inv1_all = index.in_session("inv1", item.subject, item.session)
    inv2_all = index.in_session("inv2", item.subject, item.session)
    inv1 = _companion(inv1_all, ents, spec)
    inv2 = _companion(inv2_all, ents, spec)
    item.inv1 = Path(inv1.path) if inv1 is not None else None
    item.inv2 = Path(inv2.path) if inv2 is not None else None
    item.inv1_phase = _phase(inv1_all, inv1)
    item.inv2_phase = _phase(inv2_all, inv2)
    t1map = _companion(index.in_session("t1map", item.subject, item.session), ents, spec, None)
    item.t1map = Path(t1map.path) if t1map is not None else None


def _computed_uni_items(index: _Index, spec: dict, planned: list[WorkItem]) -> list[WorkItem]:
    """Sessions with complex INV1 and INV2 but no UNI/T1w planned: compute UNI from them."""
    have = {(it.subject, it.session) for it in planned}
    sessions = sorted({(f.entities.get("subject"), f.entities.get("session"))
                       for f in index.files("inv1")} - have, key=lambda s: (s[0], s[1] or ""))
    out = []
    for subject, session in sessions:
        inv1_all = index.in_session("inv1", subject, session)
        inv2_all = index.in_session("inv2", subject, session)
        inv1 = _companion(inv1_all, {}, spec)
        inv2 = _companion(inv2_all, {}, spec)
        if inv1 is None or inv2 is None:
            continue
        p1, p2 = _phase(inv1_all, inv1), _phase(inv2_all, inv2)
        if p1 is None or p2 is None:
            LOGGER.warning("sub-%s%s: INV1/INV2 magnitudes without phase and no UNI: skipped "
                           "(the UNI sign cannot be recovered from magnitudes alone)",
                           subject, f" ses-{session}" if session else "")
            continue
        entities, _ = _image_entities(inv2)
        for key in ("inv", "part", "echo"):
            entities.pop(key, None)
        out.append(WorkItem(
            subject=subject, session=session, contrast="MP2RAGE", image=None,
            rule="uni-from-inversions",
            explain="no UNI stored: UNI computed from complex INV1 and INV2",
            inv1=Path(inv1.path), inv2=Path(inv2.path), inv1_phase=p1, inv2_phase=p2,
            entities=entities, source_suffix="UNIT1"))
    return out


# -- content checks --------------------------------------------------------------------------

_ANNEX_MARKERS = ("/annex/objects/", ".git/annex/objects")


def _annex_pointer(path: Path) -> bool:
    """True for a git-annex/DataLad file whose content was never fetched."""
    if path.is_symlink():
        target = str(path.readlink())
        return not path.exists() or any(m in target for m in _ANNEX_MARKERS) and \
            not path.resolve().is_file()
    try:
        if path.stat().st_size < 1024:
            head = path.read_bytes()[:200]
            return head.startswith(b"/annex/objects/")
    except OSError:
        return False
    return False


def missing_content(items: list[WorkItem]) -> None:
    """Refuse (exit 66) when selected inputs are DataLad/git-annex files not yet fetched."""
    missing = []
    for item in items:
        for path in (item.image, item.inv1, item.inv2, item.inv1_phase, item.inv2_phase):
            if path is not None and _annex_pointer(Path(path)):
                missing.append(str(path))
    if missing:
        shown = "\n  ".join(missing[:20]) + (f"\n  ... {len(missing) - 20} more"
                                              if len(missing) > 20 else "")
        raise MissingInputError(
            f"{len(missing)} selected input file(s) have no content yet (DataLad/git-annex "
            f"placeholders):\n  {shown}",
            hint="fetch them first, e.g. `datalad get " + " ".join(missing[:3])
                 + ("` (or the whole subject folders)" if len(missing) > 3 else "`"))


# -- label checks ----------------------------------------------------------------------------

def check_labels(layout, participant_label: list[str] | None,
                 session_label: list[str] | None) -> None:
    """Refuse labels that do not exist in the dataset (exit 18), listing those that do."""
    if participant_label:
        existing = sorted(p.name[4:] for p in Path(layout.root).glob("sub-*") if p.is_dir())
        missing = sorted(set(participant_label) - set(existing))
        if missing:
            raise NoFilesSelected(
                f"participant label(s) not found in the dataset: {', '.join(missing)}",
                path=layout.root, hint=f"existing labels: {_short_list(existing)}")
    if session_label:
        # session folders on disk, not pybids' index: the index holds anatomical images only
        # (a session with only fMRI would look absent) and reads labels from the whole path
        subjects = [f"sub-{p}" for p in participant_label] if participant_label else ["sub-*"]
        existing = sorted({p.name[4:] for s in subjects
                           for p in Path(layout.root).glob(f"{s}/ses-*") if p.is_dir()})
        missing = sorted(set(session_label) - set(existing))
        if missing:
            raise NoFilesSelected(
                f"session label(s) not found: {', '.join(missing)}", path=layout.root,
                hint=f"existing sessions: {_short_list(existing) if existing else 'none'}")


def unmatched_selection(items: list[WorkItem], participant_label: list[str] | None,
                        session_label: list[str] | None) -> tuple[list[str], list[str]]:
    """Selected participants and sessions that exist but hold no image to segment.

    Returns
    -------
    participants, sessions : list of str
        Labels given on the command line for which the plan has no work item (e.g. a session
        with only functional or diffusion data).
    """
    subjects = {it.subject for it in items}
    sessions = {it.session for it in items}
    return ([p for p in participant_label or [] if p not in subjects],
            [s for s in session_label or [] if s not in sessions])


def _short_list(values: list[str], limit: int = 30) -> str:
    if len(values) <= limit:
        return ", ".join(values)
    return ", ".join(values[:limit]) + f", ... ({len(values)} in all)"


def plan_table(items: list[WorkItem], root: Path | None = None) -> str:
    """The work plan as a plain-text table (``--dry-run`` prints it)."""
    def rel(p: Path | None) -> str:
        if p is None:
            return "-"
        try:
            return str(Path(p).relative_to(root)) if root else Path(p).name
        except ValueError:
            return str(p)

    header = ("subject", "session", "contrast", "image", "companions", "rule", "inputs")
    rows = [(it.subject, it.session or "-", it.contrast,
             rel(it.image) if it.image else "(UNI computed)", it.companions, it.rule,
             "unusable (below)" if it.problem else "ok")
            for it in items]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ = ["WorkItem", "discover", "check_filters", "read_filter_file", "check_labels",
           "plan_table", "load_spec", "missing_content", "unmatched_selection",
           "LONG_TO_SHORT"]
