"""The one cls/seg/both choice of a model's heads, spelled ``objective`` in pretrain and ``task`` in finetune."""
from __future__ import annotations

from dataclasses import dataclass

from synthvit.io import SynthvitError

OBJECTIVES = ("cls", "seg", "cls+seg")
_SPELLINGS = {"cls": (True, False), "seg": (False, True), "cls+seg": (True, True), "both": (True, True)}


@dataclass(frozen=True)
class Heads:
    """The one cls/seg/both choice: which heads a model has. Pretrain spells it ``objective`` (cls, seg,
    cls+seg), finetune ``task`` (cls, seg, both); :meth:`parse` reads either spelling."""
    has_cls: bool
    has_seg: bool

    @classmethod
    def parse(cls, value: str | Heads) -> Heads:
        if isinstance(value, Heads):
            return value
        if value not in _SPELLINGS:
            raise SynthvitError(f"heads {value!r}: use an objective of {OBJECTIVES} or a task of cls, seg, both")
        return cls(*_SPELLINGS[value])

    @property
    def objective(self) -> str:
        """Pretrain's spelling: cls, seg or cls+seg."""
        return "cls+seg" if self.has_cls and self.has_seg else "cls" if self.has_cls else "seg"

    @property
    def task(self) -> str:
        """Finetune's spelling: cls, seg or both."""
        return "both" if self.has_cls and self.has_seg else self.objective
