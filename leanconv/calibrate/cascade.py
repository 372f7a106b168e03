"""Where each layer's calibration pairs come from: the exact cascade's activations, kept at the boundary.

The exact cascade fits layer k on the input the converted network gives it once layers 1..k-1 are
final, against the original layer's output. ``GraphBoundary`` runs both networks as torch.fx
graphs, node by node in topological order, and keeps every batch's live values at the boundary of
the layer being fitted (in memory up to a budget, in temporary files beyond it): reaching the next
layer runs only the nodes in between, so the whole cascade costs about one pass of both networks
over the images, plus one pass of each layer over its own input per refit. ``HookBoundary`` is the
fallback for a model torch.fx cannot run node by node: each batch runs from the image up to the
layer, every time (about layers / 2 passes per refit step).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
import torch.fx
from torch import Tensor, nn

from leanconv.calibrate.bn import BatchNormMatcher
from leanconv.calibrate.capture import hooks, input_of, output_of
from leanconv.errors import ModelError

Pair = tuple[Tensor, Tensor]  # (replacement input (B, C, H, W), original output (B, C', H', W'))


class ActivationStore:
    """Values per key: in memory while their total stays within ``budget`` bytes, else in a temporary
    file (tensors saved with ``torch.save``, read back with ``weights_only=True``). ``close`` deletes
    the files."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.used = 0
        self.peak = 0               # most bytes held in memory at once
        self.written = 0            # bytes written to files, in all
        self.mem: dict[str, tuple[dict, int]] = {}
        self.disk: dict[str, tuple[Path, dict, torch.device]] = {}
        self._dir: Path | None = None

    def put(self, key: str, values: dict) -> None:
        self.drop(key)
        tensors = {k: v for k, v in values.items() if isinstance(v, Tensor)}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.used + size <= self.budget:
            self.mem[key] = (values, size)
            self.used += size
            self.peak = max(self.peak, self.used)
            return
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="leanconv-calib-"))
        path = self._dir / f"{key}.pt"
        device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        torch.save({k: v.detach().cpu() for k, v in tensors.items()}, path)
        self.written += size
        self.disk[key] = (path, {k: v for k, v in values.items() if k not in tensors}, device)

    def get(self, key: str) -> dict:
        if key in self.mem:
            return dict(self.mem[key][0])
        path, others, device = self.disk[key]
        loaded = torch.load(path, weights_only=True, map_location=device)
        return {**others, **loaded}

    def drop(self, key: str) -> None:
        if key in self.mem:
            self.used -= self.mem.pop(key)[1]
        elif key in self.disk:
            self.disk.pop(key)[0].unlink(missing_ok=True)

    def close(self) -> None:
        self.mem.clear()
        self.disk.clear()
        self.used = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class _Graph:
    """A network traced with leanconv's tracer, run node by node on a dict of live values."""

    def __init__(self, model: nn.Module) -> None:
        from leanconv.passes.trace import trace

        self.gm = trace(model)  # shares model's modules (and their hooks)
        self.nodes = list(self.gm.graph.nodes)
        inputs = [n for n in self.nodes if n.op == "placeholder"]
        if not inputs or any(not n.args for n in inputs[1:]):
            raise ModelError("the model's forward takes more than one input without a default")
        self.input = inputs[0]
        self.defaults = {n.name: n.args[0] for n in inputs[1:]}
        self.last_use: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            self.last_use.setdefault(n.name, i)  # a value nothing uses dies at once
            for a in n.all_input_nodes:
                self.last_use[a.name] = i
        self.interp = torch.fx.Interpreter(self.gm, garbage_collect_values=False)

    def position(self, target: str) -> int:
        """Index of the one ``call_module`` node of ``target``."""
        at = [i for i, n in enumerate(self.nodes) if n.op == "call_module" and n.target == target]
        if len(at) != 1:
            raise ModelError(f"{target} is called {len(at)} times in the traced graph")
        return at[0]

    def start(self, x: Tensor) -> dict:
        return {self.input.name: x, **self.defaults}

    def run(self, env: dict, lo: int, hi: int) -> dict:
        """Run nodes ``lo .. hi-1`` on the live values ``env`` (name -> value); returns the new ones."""
        by_node = {n: env[n.name] for n in self.nodes if n.name in env}
        self.interp.env = by_node
        for i in range(lo, hi):
            node = self.nodes[i]
            if node.op in ("placeholder", "output"):
                continue
            by_node[node] = self.interp.run_node(node)
            for a in node.all_input_nodes + [node]:
                if self.last_use.get(a.name, -1) <= i:
                    by_node.pop(a, None)
        self.interp.env = {}
        out = {n.name: v for n, v in by_node.items()}
        out.update({k: v for k, v in env.items() if k.startswith("__")})
        return out

    def check(self, model: nn.Module, x: Tensor) -> None:
        """Raise ModelError unless running node by node gives what ``model`` gives on ``x``."""
        out_node = self.nodes[-1]
        env = self.run(self.start(x), 0, len(self.nodes))
        got = torch.fx.node.map_arg(out_node.args[0], lambda n: env[n.name])
        want = model(x)
        a = [t for t in torch.utils._pytree.tree_leaves(got) if isinstance(t, Tensor)]
        b = [t for t in torch.utils._pytree.tree_leaves(want) if isinstance(t, Tensor)]
        if len(a) != len(b) or not a or any(u.shape != v.shape or not torch.allclose(u, v, rtol=1e-4, atol=1e-5)
                                            for u, v in zip(a, b)):
            raise ModelError("running the traced graph node by node does not give the model's output")

    def value(self, env: dict, position: int, arg: int = 0):
        """The value of argument ``arg`` of the node at ``position``."""
        a = self.nodes[position].args[arg]
        if not isinstance(a, torch.fx.Node):
            raise ModelError(f"{self.nodes[position].target}: its input is not a traced value")
        return env[a.name]


class GraphBoundary:
    """Both networks' live values at the boundary of the layer being fitted, for every batch.

    Args:
        batches: image batches, fit ones then validation ones (``val`` flags which).
        names: the converted layers, in call order.
        bn: with a BatchNormMatcher, every BatchNorm between layers normalizes each batch with its
            corrected statistics as the networks advance (see ``calibrate.bn``), and the statistics
            it collects are the final network's: ``finish`` writes them.
    Raises:
        ModelError: a network that cannot be traced or run node by node (use ``HookBoundary``).
    """

    def __init__(self, original: nn.Module, converted: nn.Module, batches: list[Tensor], val: list[bool],
                 names: list[str], budget: float, parallel: bool, bn: BatchNormMatcher | None) -> None:
        self.orig, self.conv = _Graph(original), _Graph(converted)
        self.at_o = [self.orig.position(n) for n in names]
        self.at_c = [self.conv.position(n) for n in names]
        if self.at_o != sorted(self.at_o) or self.at_c != sorted(self.at_c):
            raise ModelError("the converted layers do not run in the same order in the traced graphs")
        self.orig.check(original, batches[0][:1])
        self.conv.check(converted, batches[0][:1])
        self.names, self.val, self.parallel, self.bn = names, val, parallel, bn
        self.store = ActivationStore(budget)
        self.pos_o = self.pos_c = 0
        self.layer = -1
        for b, x in enumerate(batches):
            self.store.put(f"o{b}", self.orig.start(x))
            self.store.put(f"c{b}", self.conv.start(x))
        self.count = len(batches)

    def reach(self, k: int) -> None:
        """Advance both networks to layer ``k``'s boundary: the original just before its conv (the
        conv's output kept as the target), the converted network just before the replacement."""
        conv = self.orig.gm.get_submodule(self.names[k])
        self._advance(self.at_o[k], self.at_c[k], lambda env: {"__target__": conv(self.orig.value(env, self.at_o[k]))})
        self.layer = k

    def finish(self) -> list[str] | None:
        """Run both networks to the end (for the BatchNorms after the last layer) and write the
        BatchNorm statistics; their names, or None without a matcher."""
        if self.bn is None:
            return None
        self._advance(len(self.orig.nodes), len(self.conv.nodes), None)
        return self.bn.apply()

    def _advance(self, to_o: int, to_c: int, extra) -> None:
        for b in range(self.count):
            env_o = {k: v for k, v in self.store.get(f"o{b}").items() if k != "__target__"}
            with hooks(pre=self.bn.original_hooks() if self.bn else None):
                env_o = self.orig.run(env_o, self.pos_o, to_o)
                if extra is not None:
                    env_o.update(extra(env_o))
            self.store.put(f"o{b}", env_o)
            env_c = self.store.get(f"c{b}")
            with hooks(post=self.bn.converted_hooks() if self.bn else None):
                env_c = self.conv.run(env_c, self.pos_c, to_c)
            self.store.put(f"c{b}", env_c)
        self.pos_o, self.pos_c = to_o, to_c

    def pairs(self, val: bool) -> Iterator[Pair]:
        """(input, target) batches of the current layer: fit batches, or validation ones."""
        k = self.layer
        for b in range(self.count):
            if self.val[b] != val:
                continue
            env_o = self.store.get(f"o{b}")
            x = self.orig.value(env_o, self.at_o[k]) if self.parallel else self.conv.value(self.store.get(f"c{b}"), self.at_c[k])
            yield x, env_o["__target__"]

    def close(self) -> None:
        self.store.close()

    def describe(self) -> dict:
        gib = 2 ** 30
        return {"runner": "graph", "memory_gib": round(self.store.peak / gib, 3),
                "disk_gib": round(self.store.written / gib, 3)}


class HookBoundary:
    """The fallback: each batch runs from the image up to the layer being fitted, every time."""

    def __init__(self, original: nn.Module, converted: nn.Module, batches: list[Tensor], val: list[bool],
                 names: list[str], modules: dict[str, tuple[nn.Module, nn.Module]], parallel: bool,
                 bn: BatchNormMatcher | None) -> None:
        self.original, self.converted, self.batches, self.val = original, converted, batches, val
        self.names, self.modules, self.parallel, self.bn = names, modules, parallel, bn
        self.layer = -1

    def reach(self, k: int) -> None:
        self.layer = k

    def finish(self) -> None:
        return None  # the BatchNorms need a pass of their own

    def pairs(self, val: bool) -> Iterator[Pair]:
        name = self.names[self.layer]
        conv, block = self.modules[name]
        for x_img, v in zip(self.batches, self.val):
            if v != val:
                continue
            with hooks(pre=self.bn.original_hooks() if self.bn else None):
                y = output_of(self.original, conv, x_img, name)
            if self.parallel:
                x = input_of(self.original, conv, x_img, name)
            else:
                with hooks(post=self.bn.converted_hooks() if self.bn else None):
                    x = input_of(self.converted, block, x_img, name)
            yield x, y  # outside the hooks: the consumer runs parts of the converted network

    def close(self) -> None:
        pass

    def describe(self) -> dict:
        return {"runner": "hooks", "memory_gib": 0.0, "disk_gib": 0.0}


class ListBoundary:
    """Captured pairs of one layer (``calibrate_block``): fit batches and validation batches."""

    def __init__(self, fit: list[Pair], val: list[Pair]) -> None:
        self.fit, self.val = fit, val

    def pairs(self, val: bool) -> Iterator[Pair]:
        return iter(self.val if val else self.fit)
