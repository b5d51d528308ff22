"""SAE architectures, one module each (`--arch`); `relu` is the standard SAE of train/sae.py."""

from ..sae import SAE
from .batchtopk import BatchTopKSAE
from .jumprelu import JumpReLUSAE
from .matryoshka import MatryoshkaSAE
from .topk import TopKSAE

ARCHITECTURES: dict[str, type[SAE]] = {c.architecture: c for c in (SAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE)}
"""By `--arch` name: the class trained."""
SAELENS_ARCHITECTURES: dict[str, type[SAE]] = {"standard": SAE, "topk": TopKSAE, "jumprelu": JumpReLUSAE}
"""By cfg.json `architecture`: the class a saved SAE loads as (BatchTopK and Matryoshka are saved as JumpReLU)."""


def build_sae(cfg, d_in: int, device) -> SAE:
    """The untrained SAE of a TrainConfig."""
    return ARCHITECTURES[cfg.arch].from_config(cfg, d_in, device)
