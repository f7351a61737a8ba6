"""Which modules are layers and which are activations, found before any hook."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from gradwatch.probes.activations import ActivationSpec, activation_spec


@dataclass
class Layer:
    """A module that directly owns trainable parameters."""

    name: str  # its named_modules() path; "" is the model itself
    module: nn.Module
    params: list[tuple[str, nn.Parameter]]  # (attribute name, parameter), trainable only


@dataclass
class Activation:
    """An activation module whose outputs we can measure."""

    name: str
    module: nn.Module
    spec: ActivationSpec


@dataclass
class Anatomy:
    """The watchable parts of a model, in named_modules() order."""

    layers: list[Layer] = field(default_factory=list)
    activations: list[Activation] = field(default_factory=list)


def anatomy(model: nn.Module) -> Anatomy:
    """Find the layers (modules owning trainable parameters) and the activation modules."""
    found = Anatomy()
    for name, module in model.named_modules():
        own = [(pn, p) for pn, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own:
            found.layers.append(Layer(name, module, own))
        spec = activation_spec(module)
        if spec is not None:
            found.activations.append(Activation(name, module, spec))
    return found

