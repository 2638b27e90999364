"""The run's privacy ledger, `privacy.json`: every access to private data is one entry.

The ledger only ever grows. Each stage's entry counts exactly the DP steps whose results are
held in that stage's saved checkpoint (the trainer rewrites it right after each checkpoint, and
on resume rebuilds it from the checkpoints). The total epsilon is always recomputed from the
entries alone, never copied from elsewhere.

A non-private control run (noise multiplier 0) has a ledger without a target (None); its
entries use the no-noise mechanism, and privacy.json says `"private": false`, `"epsilon": null`
and carries the NOT PRIVATE label: no finite epsilon is ever written for it. A private ledger
(with a target) refuses no-noise entries.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dplatent.errors import PrivacyError
from dplatent.io import write_json
from dplatent.privacy.accounting import ACCOUNTANTS, NO_NOISE, NOT_PRIVATE, DPEvent, epsilon

FILENAME = "privacy.json"


def run_privacy_status(config: dict | None, ledger: dict | None,
                       *records: dict | None) -> tuple[bool, str]:
    """(private?, reason) of a run from its saved files: the one place that decides whether a
    run may be presented as differentially private.

    NOT PRIVATE when the ledger is missing, when the configuration is a non-private control
    (or its derived section says so), when the ledger or any other record (e.g. audit.json)
    says `"private": false`, or when the ledger holds no finite epsilon. `reason` is empty for
    a private run."""
    if ledger is None:
        return False, f"the run has no privacy ledger ({FILENAME})"
    config = config or {}
    if (config.get("privacy") or {}).get("non_private_control") is True \
            or (config.get("derived") or {}).get("private") is False \
            or any(r.get("private") is False for r in (ledger, *records) if r is not None):
        label = str(ledger.get("label") or "non-private control run (noise multiplier 0)")
        return False, label.removeprefix("NOT PRIVATE: ")
    eps = ledger.get("epsilon")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        return False, "the privacy ledger holds no finite epsilon"
    return True, ""


class Ledger:
    """`target_epsilon=None` marks the ledger of a non-private control run."""

    def __init__(self, *, accountant: str, target_epsilon: float | None, delta: float,
                 events: list[DPEvent] | None = None) -> None:
        if accountant not in ACCOUNTANTS:
            raise PrivacyError(f"unknown accountant {accountant!r}")
        self.accountant = accountant
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.events: list[DPEvent] = []
        for e in events or []:
            if any(old.stage == e.stage for old in self.events):
                raise PrivacyError(f"ledger: stage {e.stage} appears twice")
            self.record(e)

    @property
    def private(self) -> bool:
        return self.target_epsilon is not None and all(e.mechanism != NO_NOISE
                                                       for e in self.events)

    def epsilon(self) -> float:
        """The composed epsilon; inf for a non-private control (even before its first step)."""
        if not self.private:
            return math.inf
        return epsilon(self.events, self.delta, self.accountant)

    def reported_epsilon(self) -> float | None:
        """What privacy.json and the logs show: the epsilon, or None when it is not finite."""
        eps = self.epsilon()
        return eps if math.isfinite(eps) else None

    def record(self, event: DPEvent) -> None:
        """Set the stage's entry to `event` (the steps paid for so far); steps never decrease."""
        if self.target_epsilon is not None and event.mechanism == NO_NOISE:
            raise PrivacyError(f"ledger: stage {event.stage} has no noise, but the ledger has "
                               f"a privacy target; a no-noise run is a non-private control")
        for i, old in enumerate(self.events):
            if old.stage == event.stage:
                same = (old.noise_multiplier, old.sample_rate, old.clip_norm,
                        old.mechanism) == (event.noise_multiplier, event.sample_rate,
                                           event.clip_norm, event.mechanism)
                if not same or event.steps < old.steps:
                    raise PrivacyError(f"ledger: stage {event.stage} cannot change its "
                                       "mechanism or lose steps")
                self.events[i] = event
                return
        self.events.append(event)

    def steps(self, stage: str) -> int:
        return next((e.steps for e in self.events if e.stage == stage), 0)

    def to_dict(self) -> dict:
        entries = []
        for e in self.events:
            alone = epsilon([e], self.delta, self.accountant)
            entries.append({**e.to_dict(),
                            "epsilon_alone": alone if math.isfinite(alone) else None})
        d = {"accountant": self.accountant, "accountant_name": ACCOUNTANTS[self.accountant],
             "target_epsilon": self.target_epsilon, "delta": self.delta,
             "entries": entries, "epsilon": self.reported_epsilon(), "private": self.private}
        if not self.private:
            d["label"] = NOT_PRIVATE
        return d

    def save(self, run_dir: Path) -> dict:
        d = self.to_dict()
        if self.target_epsilon is not None and (
                d["epsilon"] is None or d["epsilon"] > self.target_epsilon * (1 + 1e-9)):
            raise PrivacyError(f"ledger epsilon {self.epsilon():.4f} exceeds the target "
                               f"{self.target_epsilon}")
        write_json(Path(run_dir) / FILENAME, d)
        return d

    @classmethod
    def load(cls, run_dir: Path) -> Ledger:
        path = Path(run_dir) / FILENAME
        try:
            d = json.loads(path.read_text())
            events = [DPEvent(**{k: v for k, v in e.items() if k != "epsilon_alone"})
                      for e in d["entries"]]
            target = d["target_epsilon"]
            return cls(accountant=d["accountant"],
                       target_epsilon=None if target is None else float(target),
                       delta=float(d["delta"]), events=events)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, PrivacyError) as exc:
            raise PrivacyError(f"{path}: unreadable privacy ledger ({exc})") from exc


def recompute(path: Path) -> float:
    """Total epsilon from a privacy.json's entries alone (ignoring its stored total); inf for a
    non-private control run."""
    return Ledger.load(Path(path).parent).epsilon()
