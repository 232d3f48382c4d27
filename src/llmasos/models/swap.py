"""Swapping modules inside a model: the one walk that quantization, LoRA and the kernels' fast modules use."""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn


def swap_modules(model: nn.Module, replace: Callable[[str, nn.Module], nn.Module | None]) -> nn.Module:
    """Replace modules inside `model`, in place: `replace(name, module)` (the dotted name, as in the state dict)
    returns the module to put in its parent instead, or None to keep it.

    The modules offered are those of the tree as it was, never the new ones, and a module's children are
    offered before it, so a replacement built from a module (`with_class`) holds its new children."""

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            walk(child, f"{prefix}{name}.")
            new = replace(prefix + name, child)
            if new is not None:
                setattr(parent, name, new)

    walk(model, "")
    return model


def with_class(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A new `cls` module holding `module`'s own parameters, buffers, children and settings: the same objects,
    so nothing is copied and the state dict keeps its keys and tensors. For classes that differ only in
    their methods, such as a faster forward pass over the same layers."""
    new = cls.__new__(cls)
    new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in vars(module).items()})
    return new
