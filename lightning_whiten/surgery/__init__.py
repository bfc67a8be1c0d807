"""Model surgery: convert the normalization layers of timm/torchvision models, and export back.

A conversion is a :class:`ConversionSpec` (what to convert to, and which modules), a
:class:`ConversionPlan` (:func:`plan_conversion`: every decision with its reason, nothing
changed yet) and its application (:meth:`ConversionPlan.apply`, or :func:`convert` for both).
"""

from .convert import convert
from .export import ExportPlan, export, fold_into_producer, plan_export
from .plan import ConversionPlan, Decision, Producer, TraceOutcome, plan_conversion
from .report import ConversionReport, ReplacedModule, SkippedModule
from .source import NormSource, Origin
from .spec import SPEC_VERSION, ConversionSpec, resolve_family
from .targets import find_targets, normalization_kind

__all__ = [
    "SPEC_VERSION",
    "ConversionPlan",
    "ConversionReport",
    "ConversionSpec",
    "Decision",
    "ExportPlan",
    "NormSource",
    "Origin",
    "Producer",
    "ReplacedModule",
    "SkippedModule",
    "TraceOutcome",
    "convert",
    "export",
    "find_targets",
    "fold_into_producer",
    "normalization_kind",
    "plan_conversion",
    "plan_export",
    "resolve_family",
]
