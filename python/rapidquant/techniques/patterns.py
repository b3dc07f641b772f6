"""Module-level graph queries for the techniques (a torch.fx trace of the model)."""
from __future__ import annotations

from torch import fx, nn

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d)
LAYERS = CONVS + CONV_T + (nn.Linear,)
BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class ModuleGraph:
    """Which module feeds which: call_module nodes of a traced model, by module name.
    ``opaque``: modules torch.fx cannot trace, kept whole ({path: why}); nothing inside them
    is seen."""

    def __init__(self, model: nn.Module):
        from rapidquant.capture import trace_modules
        self.model = model
        self.gm, self.opaque = trace_modules(model)
        self.modules = dict(model.named_modules())
        self.nodes = [n for n in self.gm.graph.nodes]

    def inside_opaque(self, types) -> list[tuple[str, str]]:
        """(name, opaque module around it) for each module of ``types`` hidden in an opaque one."""
        outer = [p for p in self.opaque if not any(p.startswith(o + ".") for o in self.opaque)]
        return [(name, path) for path in outer for name, m in self.model.get_submodule(path).named_modules(
                    prefix=path) if isinstance(m, types)]

    def module(self, node: fx.Node):
        return self.modules.get(node.target) if node.op == "call_module" else None

    def users(self, node: fx.Node) -> list[fx.Node]:
        return list(node.users)

    def single_user(self, node: fx.Node) -> fx.Node | None:
        us = self.users(node)
        return us[0] if len(us) == 1 else None

    def module_nodes(self, types) -> list[fx.Node]:
        return [n for n in self.nodes if isinstance(self.module(n), types)]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def out_axis(layer: nn.Module) -> int:
    """Axis of the weight that indexes output channels."""
    return 1 if isinstance(layer, CONV_T) else 0


def in_axis(layer: nn.Module) -> int:
    return 0 if isinstance(layer, CONV_T) else 1


def is_depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, CONVS) and layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels
