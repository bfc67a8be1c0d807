"""lightning-whiten: batch whitening (IterNorm, DBN, SWBN) for PyTorch and PyTorch Lightning.

Every name is imported on first use (PEP 562): ``import lightning_whiten`` itself loads
nothing heavy, so ``lightning-whiten --help`` answers without importing torch, and the core
(layers, functional, surgery, diagnostics) never imports Lightning; the Lightning adapters
(``WhiteningCallback``, ``WhiteningMonitor``, ``ImageClassifier``, ``data``, ``cli``) load it
when they are first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    "ConvNorm2d": "layers",
    "DBN": "layers",
    "DBNAct": "layers",
    "IterNorm": "layers",
    "IterNormAct": "layers",
    "LpNorm": "layers",
    "StreamingNorm": "layers",
    "SWBN": "layers",
    "SWBNAct": "layers",
    "WhiteningNorm": "layers",
    "NormFamily": "registry",
    "NormSAM": "sam",
    "register_family": "registry",
    "ConversionPlan": "surgery",
    "ConversionReport": "surgery",
    "ConversionSpec": "surgery",
    "convert": "surgery",
    "export": "surgery",
    "plan_conversion": "surgery",
    "load_converted": "checkpoint",
    "recalibrate": "recalibration",
    "restore_conversion": "checkpoint",
    "WhitenedModuleMixin": "checkpoint",
    "convert_in_configure_model": "callbacks",
    "WhiteningCallback": "callbacks",
    "WhiteningMonitor": "callbacks",
    "NormalizationAnalysis": "callbacks",
    "NormSAMCallback": "callbacks",
    "ImageClassifier": "models",
}
_SUBMODULES = (
    "adversarial",
    "callbacks",
    "checkpoint",
    "cli",
    "data",
    "diagnostics",
    "fewshot",
    "functional",
    "layers",
    "models",
    "recalibration",
    "noise",
    "registry",
    "sam",
    "schedules",
    "surgery",
    "text",
)

__all__ = [
    "DBN",
    "SWBN",
    "ConvNorm2d",
    "ConversionPlan",
    "ConversionReport",
    "ConversionSpec",
    "DBNAct",
    "ImageClassifier",
    "IterNorm",
    "IterNormAct",
    "LpNorm",
    "NormFamily",
    "NormSAM",
    "NormSAMCallback",
    "NormalizationAnalysis",
    "SWBNAct",
    "StreamingNorm",
    "WhitenedModuleMixin",
    "WhiteningCallback",
    "WhiteningMonitor",
    "WhiteningNorm",
    "__version__",
    "adversarial",
    "convert",
    "convert_in_configure_model",
    "diagnostics",
    "export",
    "functional",
    "load_converted",
    "plan_conversion",
    "recalibrate",
    "recalibration",
    "register_family",
    "registry",
    "restore_conversion",
    "sam",
    "schedules",
    "surgery",
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'lightning_whiten' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})


if TYPE_CHECKING:  # for type checkers and IDEs: the names above, statically
    from . import (
        adversarial,
        diagnostics,
        functional,
        recalibration,
        registry,
        sam,
        schedules,
        surgery,
    )
    from .callbacks import (
        NormalizationAnalysis,
        NormSAMCallback,
        WhiteningCallback,
        WhiteningMonitor,
        convert_in_configure_model,
    )
    from .checkpoint import WhitenedModuleMixin, load_converted, restore_conversion
    from .layers import (
        DBN,
        SWBN,
        ConvNorm2d,
        DBNAct,
        IterNorm,
        IterNormAct,
        LpNorm,
        StreamingNorm,
        SWBNAct,
        WhiteningNorm,
    )
    from .models import ImageClassifier
    from .recalibration import recalibrate
    from .registry import NormFamily, register_family
    from .sam import NormSAM
    from .surgery import (
        ConversionPlan,
        ConversionReport,
        ConversionSpec,
        convert,
        export,
        plan_conversion,
    )
