"""Model surgery: convert the normalization layers of timm/torchvision models, and export back."""

from .convert import NormSource, convert
from .export import ExportPlan, export, plan_export
from .registry import LAYERS, resolve_layer
from .report import ConversionReport, ReplacedModule, SkippedModule
from .select import find_normalization_modules, normalization_kind

__all__ = [
    "LAYERS",
    "ConversionReport",
    "ExportPlan",
    "NormSource",
    "ReplacedModule",
    "SkippedModule",
    "convert",
    "export",
    "find_normalization_modules",
    "normalization_kind",
    "plan_export",
    "resolve_layer",
]
