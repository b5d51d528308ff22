"""One trainer per file, all on the shared base (dictionary_learning's layout)."""

from .base import Trainer
from .baseline import BaselineTrainer
from .ratio import RatioTrainer
from .seed_coactivation import SeedCoactivationTrainer
from .seed_halves import SeedHalvesTrainer

TRAINERS: dict[str, type[Trainer]] = {t.name: t for t in (BaselineTrainer, RatioTrainer, SeedHalvesTrainer,
                                                           SeedCoactivationTrainer)}
