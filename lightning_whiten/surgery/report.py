"""What :func:`lightning_whiten.convert` did, as data, a rich table and a plain dict."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ConversionReport", "ReplacedModule", "SkippedModule"]


@dataclass(frozen=True)
class ReplacedModule:
    """A normalization module that was replaced by a whitening layer."""

    name: str
    old_type: str
    new_type: str
    num_features: int
    group_sizes: tuple[int, ...]
    notes: tuple[str, ...] = ()

    @property
    def groups(self) -> str:
        """Compact group layout, e.g. ``"4x16"`` or ``"2x16+8"``."""
        sizes = self.group_sizes
        full = [s for s in sizes if s == sizes[0]]
        text = f"{len(full)}x{sizes[0]}"
        return text + "".join(f"+{s}" for s in sizes[len(full) :])


@dataclass(frozen=True)
class SkippedModule:
    """A normalization module that was left as it was, and why."""

    name: str
    type: str
    num_features: int | None
    reason: str


@dataclass
class ConversionReport:
    """The result of :func:`lightning_whiten.convert`.

    Attributes:
        layer: name of the whitening layer class used.
        spec: the arguments of the conversion (layer, options, selection), enough to redo it on
            a fresh model (used for checkpoints).
        replaced: the replaced modules, in module order.
        skipped: the normalization modules left alone, with the reason.
    """

    layer: str
    spec: dict[str, Any]
    replaced: list[ReplacedModule] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)

    @property
    def num_replaced(self) -> int:
        return len(self.replaced)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def counts(self) -> dict[str, int]:
        """Flat counts for logging as hyperparameters."""
        out = {"replaced": self.num_replaced, "skipped": self.num_skipped}
        for old_type, n in Counter(r.old_type for r in self.replaced).items():
            out[f"replaced/{old_type}"] = n
        for t, n in Counter(s.type for s in self.skipped).items():
            out[f"skipped/{t}"] = n
        return out

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON/YAML-serializable dict (for loggers and checkpoints)."""
        return {
            "layer": self.layer,
            "spec": self.spec,
            "replaced": [
                {**asdict(r), "group_sizes": list(r.group_sizes), "notes": list(r.notes)}
                for r in self.replaced
            ],
            "skipped": [asdict(s) for s in self.skipped],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConversionReport:
        return cls(
            layer=data["layer"],
            spec=dict(data["spec"]),
            replaced=[
                ReplacedModule(
                    **{
                        **r,
                        "group_sizes": tuple(r["group_sizes"]),
                        "notes": tuple(r.get("notes", ())),
                    }
                )
                for r in data["replaced"]
            ],
            skipped=[SkippedModule(**s) for s in data["skipped"]],
        )

    def table(self):
        """A :class:`rich.table.Table` listing replaced and skipped modules."""
        from rich.table import Table

        table = Table(
            title=f"lightning-whiten: {self.num_replaced} normalization layers -> {self.layer}, "
            f"{self.num_skipped} skipped",
            title_justify="left",
        )
        for column in ("module", "was", "now", "channels", "groups", "note"):
            table.add_column(column, overflow="fold")
        for r in self.replaced:
            table.add_row(
                r.name, r.old_type, r.new_type, str(r.num_features), r.groups, "; ".join(r.notes)
            )
        for s in self.skipped:
            table.add_row(
                s.name,
                s.type,
                "[dim]unchanged[/dim]",
                "" if s.num_features is None else str(s.num_features),
                "",
                s.reason,
            )
        return table

    def __rich__(self):
        return self.table()

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=140, record=True, force_terminal=False, color_system=None)
        with console.capture() as capture:
            console.print(self.table())
        return capture.get()

    def __repr__(self) -> str:
        return (
            f"ConversionReport(layer={self.layer!r}, replaced={self.num_replaced}, "
            f"skipped={self.num_skipped})"
        )
