"""Knowing when not to answer: each model version's domain gate (:mod:`xrayfm.domain.gate`), the cheap
input checks in front of it (:mod:`xrayfm.domain.checks`) and the features it scores
(:mod:`xrayfm.domain.features`, torch). Every answer carries the verdict: ``in_domain``, ``score``,
``threshold``, ``reasons``."""

from xrayfm.domain.checks import DeclaredDomain, DomainVerdict, InputFacts, Reason, input_reasons
from xrayfm.domain.gate import GATE_JSON, GATE_TENSORS, DomainGate, input_only_verdict

__all__ = [
    "GATE_JSON",
    "GATE_TENSORS",
    "DeclaredDomain",
    "DomainGate",
    "DomainVerdict",
    "InputFacts",
    "Reason",
    "input_only_verdict",
    "input_reasons",
]
