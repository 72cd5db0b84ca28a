"""Adversarial attacks, written here (no torchattacks): an optimiser times a gradient oracle.

Optimisers (:mod:`.core`, :mod:`.apgd`): PGD (L-inf and L2, seeded random start,
step, iterations, loss trace) and AutoAttack's APGD with the CE or DLR loss. Oracles
(:mod:`.oracles`, :mod:`.fullgrad`, :mod:`.gate`) say what is differentiated: the bare
recogniser (gray-box), a defence by BPDA (identity backward, averaged over its voting
members), EOT over a stochastic defence, TT over temporal translations, the exact
VideoPure map with checkpointing per UNet call, or the recogniser and the detection gate
together. Every attack keeps the result in the norm ball around the clip and in [0, 1].
"""

from vpure.lab.attacks.apgd import apgd
from vpure.lab.attacks.core import attack, pgd, project, sparse_frames
from vpure.lab.attacks.oracles import BPDAOracle, EOTOracle, ModelOracle, TTOracle

__all__ = ["BPDAOracle", "EOTOracle", "ModelOracle", "TTOracle", "apgd", "attack", "pgd", "project", "sparse_frames"]
