"""Capture layer inputs and outputs with forward hooks that are always removed, even when a batch raises."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from torch import Tensor, nn

from leanconv.errors import ModelError


class StopForward(Exception):
    """Raised from a hook to end a forward pass early, once what was needed has been seen."""


@contextmanager
def hooks(pre: dict[nn.Module, Callable] | None = None, post: dict[nn.Module, Callable] | None = None
          ) -> Iterator[None]:
    """Register ``fn(module, args)`` forward pre-hooks and ``fn(module, args, output)`` forward hooks
    for the duration of the block; every handle is removed on exit, whatever happens inside."""
    handles = []
    try:
        for m, fn in (pre or {}).items():
            handles.append(m.register_forward_pre_hook(fn))
        for m, fn in (post or {}).items():
            handles.append(m.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def run(model: nn.Module, x: Tensor) -> None:
    """Forward ``x`` through ``model``, treating StopForward as a normal early end."""
    try:
        model(x)
    except StopForward:
        pass


def input_of(model: nn.Module, module: nn.Module, x: Tensor, what: str = "layer") -> Tensor:
    """The input ``module`` receives on its first call when ``model`` runs on ``x``; stops right there."""
    seen: list[Tensor] = []

    def pre(_m, args):
        seen.append(args[0])
        raise StopForward

    with hooks(pre={module: pre}):
        run(model, x)
    if not seen:
        raise ModelError(f"{what} was not called in the forward pass")
    return seen[0]


def output_of(model: nn.Module, module: nn.Module, x: Tensor, what: str = "layer") -> Tensor:
    """The output of ``module``'s first call when ``model`` runs on ``x``; stops right after it."""
    seen: list[Tensor] = []

    def post(_m, _args, out):
        seen.append(out)
        raise StopForward

    with hooks(post={module: post}):
        run(model, x)
    if not seen:
        raise ModelError(f"{what} was not called in the forward pass")
    return seen[0]


def each_call(model: nn.Module, modules: dict[str, nn.Module], x: Tensor,
              fn: Callable[[str, Tensor, Tensor], None], stop_after: str | None = None) -> None:
    """Run ``model`` on ``x`` calling ``fn(name, input, output)`` at the first call of each named
    module; the pass ends after ``stop_after`` (when given) has been seen."""
    done: set[str] = set()

    def post_for(name: str):
        def post(_m, args, out):
            if name in done:
                return
            done.add(name)
            fn(name, args[0], out)
            if name == stop_after:
                raise StopForward
        return post

    with hooks(post={m: post_for(n) for n, m in modules.items()}):
        run(model, x)


def call_order(model: nn.Module, modules: dict[str, nn.Module], x: Tensor) -> list[str]:
    """Names of ``modules`` in the order of their first call in one forward pass (uncalled left out)."""
    order: list[str] = []

    def pre_for(name: str):
        def pre(_m, _args):
            if name not in order:
                order.append(name)
        return pre

    with hooks(pre={m: pre_for(n) for n, m in modules.items()}):
        run(model, x)
    return order
