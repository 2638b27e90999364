"""The run's privacy ledger, `privacy.json`: every access to private data is one entry.

The ledger only ever grows. Each stage's entry counts exactly the DP steps whose results are
held in that stage's saved checkpoint (the trainer rewrites it right after each checkpoint, and
on resume rebuilds it from the checkpoints). The total epsilon is always recomputed from the
entries alone, never copied from elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

from dplatent.errors import PrivacyError
from dplatent.io import write_json
from dplatent.privacy.accounting import ACCOUNTANTS, DPEvent, epsilon

FILENAME = "privacy.json"


class Ledger:
    def __init__(self, *, accountant: str, target_epsilon: float, delta: float,
                 events: list[DPEvent] | None = None) -> None:
        if accountant not in ACCOUNTANTS:
            raise PrivacyError(f"unknown accountant {accountant!r}")
        self.accountant = accountant
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.events: list[DPEvent] = list(events or [])

    def epsilon(self) -> float:
        return epsilon(self.events, self.delta, self.accountant)

    def record(self, event: DPEvent) -> None:
        """Set the stage's entry to `event` (the steps paid for so far); steps never decrease."""
        for i, old in enumerate(self.events):
            if old.stage == event.stage:
                same = (old.noise_multiplier, old.sample_rate, old.clip_norm) == (
                    event.noise_multiplier, event.sample_rate, event.clip_norm)
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
            entries.append({**e.to_dict(),
                            "epsilon_alone": epsilon([e], self.delta, self.accountant)})
        return {"accountant": self.accountant, "accountant_name": ACCOUNTANTS[self.accountant],
                "target_epsilon": self.target_epsilon, "delta": self.delta,
                "entries": entries, "epsilon": self.epsilon()}

    def save(self, run_dir: Path) -> dict:
        d = self.to_dict()
        if d["epsilon"] > self.target_epsilon * (1 + 1e-9):
            raise PrivacyError(f"ledger epsilon {d['epsilon']:.4f} exceeds the target "
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
            return cls(accountant=d["accountant"], target_epsilon=float(d["target_epsilon"]),
                       delta=float(d["delta"]), events=events)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, PrivacyError) as exc:
            raise PrivacyError(f"{path}: unreadable privacy ledger ({exc})") from exc


def recompute(path: Path) -> float:
    """Total epsilon from a privacy.json's entries alone (ignoring its stored total)."""
    return Ledger.load(Path(path).parent).epsilon()
