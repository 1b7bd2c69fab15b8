"""In-domain or out-of-domain: does an image resemble what the model was trained on?

The method's paper reports results separately for images like the training data (in-domain)
and for a held-out institution (out-of-domain); the evaluation tables do the same. The model
card (``cl_model.json``) says what a model was trained on. It is found by the sha256 that every
image record carries (the card's own sha256, which pins every file of the model).

The rule, first that applies:

1. The card's ``training.sites`` (list) and a ``site`` column in participants.tsv: in-domain
   when the participant's site is in the list.
2. The card's ``training.protocols`` or ``training.simulator.protocols`` (what
   ``scripts/train_demo_model.py`` records) and a ``protocol`` column in participants.tsv:
   in-domain when the participant's protocol is in the list.
3. The card's ``input.contrasts`` (``UNIT1``, ``T1w``): in-domain when the image's contrast
   (MP2RAGE -> ``UNIT1``, MPRAGE -> ``T1w``) is one of them.
4. Otherwise (no card found): ``unknown``.

>>> card = {"training": {"simulator": {"protocols": ["3T-MP2RAGE"]}},
...         "input": {"contrasts": ["UNIT1"]}}
>>> rule = domain_rule(card, has_site=True, has_protocol=True)
>>> print(rule.describe())
in-domain when the participant's protocol (participants.tsv) is one of 3T-MP2RAGE
>>> rule.classify(site="site02", protocol="3T-MPRAGE", contrast="MPRAGE")
'out-of-domain'
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)

IN_DOMAIN, OUT_OF_DOMAIN, UNKNOWN = "in-domain", "out-of-domain", "unknown"
_CONTRAST_SUFFIX = {"MP2RAGE": "UNIT1", "MPRAGE": "T1w"}
_CARD = "cl_model.json"


@dataclass(frozen=True)
class DomainRule:
    """Which participant or image property decides the domain, and the training values."""

    kind: str  # "site", "protocol", "contrast" or "none"
    values: frozenset[str]

    def classify(self, site: str | None, protocol: str | None, contrast: str | None) -> str:
        """``in-domain``, ``out-of-domain`` or ``unknown`` for one image."""
        if self.kind == "none":
            return UNKNOWN
        value = {"site": site, "protocol": protocol,
                 "contrast": _CONTRAST_SUFFIX.get(str(contrast), contrast)}[self.kind]
        if value is None:
            return UNKNOWN
        return IN_DOMAIN if value in self.values else OUT_OF_DOMAIN

    def describe(self) -> str:
        """The rule in one sentence, for the report."""
        listed = ", ".join(sorted(self.values))
        return {
            "site": f"in-domain when the participant's site (participants.tsv) is one of {listed}",
            "protocol": "in-domain when the participant's protocol (participants.tsv) is one "
                        f"of {listed}",
            "contrast": f"in-domain when the image's contrast is one the model card lists "
                        f"as input ({listed})",
            "none": "unknown: the model card was not found",
        }[self.kind]


def domain_rule(card: dict | None, has_site: bool, has_protocol: bool) -> DomainRule:
    """The rule that applies for a model card and a dataset (see the module docstring).

    >>> domain_rule(None, True, True).kind
    'none'
    >>> domain_rule({"input": {"contrasts": ["UNIT1", "T1w"]}}, False, False).kind
    'contrast'
    """
    if not card:
        return DomainRule("none", frozenset())
    training = card.get("training") if isinstance(card.get("training"), dict) else {}
    sites = _strings(training.get("sites"))
    if sites and has_site:
        return DomainRule("site", frozenset(sites))
    simulator = training.get("simulator") if isinstance(training.get("simulator"), dict) else {}
    protocols = _strings(training.get("protocols")) or _strings(simulator.get("protocols"))
    if protocols and has_protocol:
        return DomainRule("protocol", frozenset(protocols))
    contrasts = _strings((card.get("input") or {}).get("contrasts"))
    if contrasts:
        return DomainRule("contrast", frozenset(contrasts))
    return DomainRule("none", frozenset())


def find_model_card(sha256: str | None, model: str | Path | None = None,
                    models_dir: str | Path | None = None) -> dict | None:
    """The model card whose sha256 is ``sha256``, or None when it cannot be found.

    Looks at the model named on the command line (a folder, or a name in the models cache),
    then every model in the models cache (including unpacked zips) and the bundled models.
    Only the card files are read; nothing is verified or unpickled.
    """
    if not sha256:
        return None
    from cl_bidsapp.models.card import sha256_bytes
    from cl_bidsapp.models.registry import bundled_models_dir, default_models_dir

    cache = Path(models_dir) if models_dir else default_models_dir()
    for card_file in _candidate_cards(model, cache, bundled_models_dir()):
        try:
            raw = card_file.read_bytes()
        except OSError:
            continue
        if sha256_bytes(raw) == sha256:
            try:
                return json.loads(raw)
            except ValueError:
                return None
    logger.info("model card with sha256 %s… not found (looked at --model and %s): "
                "the training domain is unknown", sha256[:12], cache)
    return None


def _candidate_cards(model, cache: Path, bundled: Path) -> Iterable[Path]:
    if model:
        path = Path(str(model)).expanduser()
        for folder in (path, cache / str(model), bundled / str(model)):
            if folder.is_dir():
                yield from sorted(folder.rglob(_CARD))
    for root in (cache, bundled):
        if root.is_dir():
            yield from sorted(root.glob(f"*/{_CARD}"))
            yield from sorted(root.glob(f".unpacked/*/**/{_CARD}"))


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None]
    return []
