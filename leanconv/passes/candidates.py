"""Which convs to convert: every k x k conv is either selected or skipped with a reason."""
from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from leanconv.passes.analyze import ConvSite, ModelFacts

if TYPE_CHECKING:  # the settings are only read here
    from leanconv.recipes.spec import Selection


@dataclass(frozen=True)
class Candidate:
    site: ConvSite
    reason: str | None  # None: to be converted

    @property
    def selected(self) -> bool:
        return self.reason is None


def is_listed(site: ConvSite) -> bool:
    """Convs that appear in a plan: those with a kernel of at least 3 in some direction."""
    return site.geometry is None or max(site.geometry.kernel_size) >= 3


def skip_reason(site: ConvSite, sel: Selection, first: str | None) -> str | None:
    """Why ``site`` is not converted under ``sel``, or None if it is a candidate."""
    g = site.geometry
    if site.refusal:
        return site.refusal
    if g is None:
        return "its padding cannot be expressed as explicit sizes (asymmetric 'same')"
    if g.groups != 1:
        return f"grouped conv (groups={g.groups}) is already cheap"
    if g.kernel_size[0] != g.kernel_size[1]:
        return f"kernel {g.kernel_size[0]}x{g.kernel_size[1]} is not square"
    if sel.include and not any(fnmatch.fnmatchcase(site.name, p) for p in sel.include):
        return "not matched by the include patterns"
    for p in sel.exclude:
        if fnmatch.fnmatchcase(site.name, p):
            return f"excluded by pattern {p!r}"
    if site.calls == 0:
        return "not run by a forward pass in eval mode (e.g. an auxiliary head)"
    if sel.skip_first and site.name == first:
        return "first conv of the network (it sees the image; select.skip_first)"
    if min(g.in_channels, g.out_channels) < sel.min_channels:
        return f"{g.in_channels}->{g.out_channels} channels, below select.min_channels={sel.min_channels}"
    if g.stride != (1, 1) and not sel.convert_strided:
        return f"stride {g.stride[0]}x{g.stride[1]} (select.convert_strided is off)"
    if site.weight_read_elsewhere:
        return "its weight or bias is read outside the conv; replacing it would break the model"
    return None


def select_candidates(facts: ModelFacts, sel: Selection) -> list[Candidate]:
    """One Candidate per listed conv, in module order. Warns when a pattern matches nothing."""
    ran = [s for s in facts.sites if s.order is not None]
    first = min(ran, key=lambda s: s.order).name if ran else None
    out = [Candidate(s, skip_reason(s, sel, first)) for s in facts.sites if is_listed(s)]
    names = [s.name for s in facts.sites]
    for p in sel.include + sel.exclude:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            warnings.warn(f"layer pattern {p!r} matches no conv of the model", stacklevel=3)
    return out
