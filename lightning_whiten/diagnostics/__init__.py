"""Diagnostics of normalization layers and of the models that use them (plain PyTorch).

* :mod:`.whitening`: SND and whiteness of one layer, skipped-batch counters.
* :mod:`.probes`: properties at initialization (Lubana et al., *Beyond BatchNorm*, 2021):
  activation variance, sample similarity and stable rank, pre-normalization spread and
  activation-gradient norms per layer.
* :mod:`.landscape`: loss and gradient smoothness along the gradient and internal covariate
  shift (Santurkar et al., *How Does Batch Normalization Help Optimization?*, 2018).

Every function here leaves the model as it found it: parameters, ``.grad``, running buffers,
module attributes, random number generators (and the optimizer's state for
:func:`covariate_shift`).

    from lightning_whiten import diagnostics as D
    D.init_probes(model, (x, y), nn.functional.cross_entropy)
"""

from ._state import ModelState
from .landscape import DEFAULT_STEP_SIZES, covariate_shift, landscape
from .probes import (
    ACTIVATION_TYPES,
    InitProbes,
    activation_variance,
    cosine_similarity,
    init_probes,
    prenorm_std,
    stable_rank,
)
from .whitening import (
    Whiteness,
    batch_transform,
    diverged_batches,
    nonfinite_batches,
    snd,
    whiteness,
)

__all__ = [
    "ACTIVATION_TYPES",
    "DEFAULT_STEP_SIZES",
    "InitProbes",
    "ModelState",
    "Whiteness",
    "activation_variance",
    "batch_transform",
    "cosine_similarity",
    "covariate_shift",
    "diverged_batches",
    "init_probes",
    "landscape",
    "nonfinite_batches",
    "prenorm_std",
    "snd",
    "stable_rank",
    "whiteness",
]
