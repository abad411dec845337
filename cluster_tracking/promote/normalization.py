"""Weight normalisation that closes the ReLU rescaling loophole of the spectral regulariser.

A ReLU is positively homogeneous: ``relu(c z) = c relu(z)`` for ``c > 0``. So multiplying a hidden
unit's incoming weights and bias by ``c`` and its outgoing weights by ``1 / c`` leaves the
network's function unchanged, while its weight graph (Filan et al. 2021, section 2: edge weights
``|W|``) changes: the unit's incoming edges grow by ``c`` and its outgoing ones shrink by ``c``.
Along these directions a clusterability penalty (:class:`~cluster_tracking.promote.regularizer.
SpectralRegularizer`, Filan et al. 2021, "Promoting clusterability") can be lowered without the
network computing anything in a more modular way, e.g. by shrinking the within-module and growing
the cross-module side of a unit, or by making a unit's edges on one side vanishingly small so it
hangs off the graph. :class:`ReLUWeightNormalizer` removes these directions: after every optimiser
step it rescales each hidden unit so that its incoming weights and bias have a fixed norm, and
compensates in the outgoing weights, so the network function is unchanged and the regulariser
only sees (and can only change) the direction of each unit's incoming weights.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx, nn

from cluster_tracking.errors import ConfigError, GraphError
from cluster_tracking.graph.fx_trace import CONV_MODULES, module_types, op_name
from cluster_tracking.graph.weights import unwrap_module

_WEIGHT_LAYERS = (nn.Linear, *CONV_MODULES)
# The weight graph also folds SyncBatchNorm (graph.fx_trace.BATCHNORM_MODULES); the normaliser
# has only ever rescaled through these three.
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_WeightLayer = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
_BatchNorm = nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d

# Maps with f(c z) = c f(z) for c > 0 that keep units apart (ReLU-like, pooling, dropout, flatten):
# a subset of the weight graph's pass-through tables (graph.fx_trace), which also pass maps that
# keep units apart without being homogeneous (tanh, GELU, normalisations), so rescaling before
# them would change the network's function.
_HOMOGENEOUS_MODULES = module_types(
    *"ReLU LeakyReLU PReLU Identity Dropout Dropout1d Dropout2d Dropout3d Flatten".split(),
    *"MaxPool1d MaxPool2d MaxPool3d AvgPool1d AvgPool2d AvgPool3d".split(),
    *"AdaptiveAvgPool1d AdaptiveAvgPool2d AdaptiveAvgPool3d".split(),
    *"AdaptiveMaxPool1d AdaptiveMaxPool2d AdaptiveMaxPool3d ZeroPad1d ZeroPad2d ZeroPad3d".split(),
)
_HOMOGENEOUS_OPS = frozenset(
    "relu relu_ leaky_relu leaky_relu_ prelu dropout dropout_ dropout1d dropout2d dropout3d "
    "flatten view reshape contiguous clone max_pool1d max_pool2d max_pool3d avg_pool1d "
    "avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d "
    "adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d".split()
)
_NOT_FEATURES = frozenset("size dim numel shape".split())

_SUPPORTED = (
    "ReLUWeightNormalizer supports networks that are one chain of nn.Linear / nn.Conv1d/2d/3d "
    "layers (each optionally followed by a BatchNorm), with only positively homogeneous maps "
    "between them (ReLU, LeakyReLU, PReLU, max/average pooling, dropout, flatten)"
)


@dataclass
class _HiddenLayer:
    """The hidden units of one layer: their incoming parameters and the layer that reads them."""

    name: str
    layer: _WeightLayer  # the layer producing the units
    batchnorm: _BatchNorm | None  # an affine BatchNorm right after it (its gamma, beta scale)
    reader: _WeightLayer  # the next layer, reading them
    reads: Literal["linear", "conv", "flatten"]
    target: float = 0.0

    def incoming_norms(self) -> torch.Tensor:
        """Norm of each unit's incoming weights and bias, ``[units]`` (BatchNorm folded in).

        ``||(W[b], bias_b)||``; with a BatchNorm ``y = a (z - mean) + beta``,
        ``a = gamma / sqrt(running_var + eps)``, the folded ``||(a_b W[b], beta_b + a_b (bias_b -
        mean_b))||``, which scales by c when ``gamma_b`` and ``beta_b`` do.
        """
        weight = self.layer.weight.detach().flatten(start_dim=1)
        bias = _bias(self.layer, weight)
        if self.batchnorm is None:
            return torch.sqrt((weight**2).sum(dim=1) + bias**2)
        bn = self.batchnorm
        gamma, beta = bn.weight.detach(), bn.bias.detach()
        if bn.running_var is not None:
            slope = gamma / torch.sqrt(bn.running_var + bn.eps)
            mean = bn.running_mean if bn.running_mean is not None else torch.zeros_like(bias)
            shift = beta + slope * (bias - mean)
        else:
            slope, shift = gamma, beta
        return torch.sqrt((weight**2).sum(dim=1) * slope**2 + shift**2)

    def rescale(self, factor: torch.Tensor) -> None:
        """Unit b's incoming parameters times ``factor[b]``, its outgoing weights divided by it."""
        if self.batchnorm is not None:
            self.batchnorm.weight.mul_(factor)
            self.batchnorm.bias.mul_(factor)
        else:
            self.layer.weight.mul_(_along_dim0(factor, self.layer.weight))
            if self.layer.bias is not None:
                self.layer.bias.mul_(factor)
        reader = self.reader.weight
        inverse = 1.0 / factor
        if self.reads == "linear":  # W'[j, b]
            reader.mul_(inverse[None, :])
        elif self.reads == "flatten" or isinstance(self.reader, nn.Linear):
            # W'[j, b * S + s]: channel b feeds the S flattened inputs b * S .. b * S + S - 1
            spatial = reader.shape[1] // len(factor)
            reader.mul_(inverse.repeat_interleave(spatial)[None, :])
        else:  # conv W'[o, a, ...]: output channel o of group g reads input channel g * (C/G) + a
            groups = int(self.reader.groups)
            per_group = reader.shape[1]
            group_of_out = torch.arange(reader.shape[0], device=reader.device) // (
                reader.shape[0] // groups
            )
            channel = group_of_out[:, None] * per_group + torch.arange(
                per_group, device=reader.device
            )
            reader.mul_(_along_dims01(inverse[channel], reader))


class ReLUWeightNormalizer:
    """Fix each hidden ReLU unit's incoming weight norm without changing the network function.

    For every hidden unit b (the outputs of every Linear/Conv layer but the last), with incoming
    weights ``W[b]`` and bias ``bias_b`` and outgoing weights ``W'[:, b]``, a call sets ::

        c_b = target / ||(W[b], bias_b)||,    W[b] *= c_b,   bias_b *= c_b,   W'[:, b] /= c_b,

    for a convolution with all of channel b's kernel entries, and for a Linear layer reading a
    flattened feature map with all of channel b's flattened inputs. Since ``relu(c z) = c relu(z)``
    for ``c > 0`` (and likewise for leaky ReLU, PReLU, max/average pooling, dropout), the network
    computes the same function before and after (up to float round-off). A unit followed by a
    BatchNorm is rescaled through the BatchNorm's ``gamma_b`` and ``beta_b`` (scaling ``W[b]``
    would be undone by the normalisation), and its norm is that of the BatchNorm-folded incoming
    weights and bias, the ones the weight graph uses. Units whose incoming weights are all 0 are
    left alone. The input and output units are never rescaled.

    **Why the regulariser needs it.** The weight graph's edge weights are ``|W|``, which these
    rescalings change but the network's function does not: without normalisation, the
    :class:`~cluster_tracking.promote.regularizer.SpectralRegularizer` (Filan et al. 2021,
    "Promoting clusterability") can lower its penalty by moving weight magnitude across units along
    function-preserving directions (e.g. shrinking one side of a unit's edges until it barely
    connects), a graph that looks clusterable only because of an arbitrary choice of scale.
    Normalising after every optimiser step keeps each unit's scale fixed, so the penalty can only
    fall through changes that the function sees.

    Use it after each optimiser step::

        normalize = ReLUWeightNormalizer(model)
        for x, y in loader:
            loss = criterion(model(x), y) + reg()
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            normalize()

    Optimiser state (momentum, Adam moments) is not rescaled with the weights; this is the usual
    practice for weight-normalisation projections and is harmless at small learning rates.

    Args:
        model: a chain of ``nn.Linear`` / ``nn.Conv1d/2d/3d`` layers, each optionally followed by
            a ``BatchNorm1d/2d/3d``, with only positively homogeneous maps between consecutive
            layers: ``ReLU``, ``LeakyReLU``, ``PReLU``, ``Identity``, dropout, max/average
            pooling, flatten (as modules or as functions). Anything may come before the first
            layer and after the last. An ``nn.Sequential`` or a module whose ``forward`` is such
            a chain (traced with ``torch.fx``).
        norm: the incoming norm every hidden unit is set to. ``None`` (default): for each layer,
            the root-mean-square of its units' incoming norms when the normaliser is built (so a
            freshly initialised network keeps its initialisation scale).

    Raises:
        GraphError: the model is not such a chain (a residual connection, a non-homogeneous
            activation such as tanh, GELU or ReLU6 between two layers, a BatchNorm without
            affine parameters, a layer used twice); the message names the offending step.
        ConfigError: ``norm`` is not a positive number.
    """

    def __init__(self, model: nn.Module, norm: float | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise GraphError(
                f"ReLUWeightNormalizer needs the nn.Module being trained, got "
                f"{type(model).__name__}."
            )
        if norm is not None and (
            isinstance(norm, bool) or not isinstance(norm, (int, float)) or not norm > 0
        ):
            raise ConfigError(f"norm must be a positive number or None, got {norm!r}.")
        self.model = unwrap_module(model)
        self.norm = None if norm is None else float(norm)
        self.layers = _hidden_layers(self.model)
        for hidden in self.layers:
            if self.norm is not None:
                hidden.target = self.norm
            else:
                norms = hidden.incoming_norms()
                norms = norms[norms > 0]
                hidden.target = float(torch.sqrt((norms**2).mean())) if len(norms) else 1.0

    def __call__(self) -> None:
        """Rescale every hidden unit to its target incoming norm (in place, no gradient)."""
        with torch.no_grad():
            for hidden in self.layers:
                norms = hidden.incoming_norms()
                alive = norms > 0
                factor = torch.where(alive, hidden.target / torch.where(alive, norms, 1.0), 1.0)
                hidden.rescale(factor)


def _bias(layer: _WeightLayer, weight: torch.Tensor) -> torch.Tensor:
    bias = layer.bias
    if bias is None:
        return weight.new_zeros(weight.shape[0])
    return bias.detach()


def _along_dim0(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def _along_dims01(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape + (1,) * (like.ndim - 2))


# ---------------------------------------------------------------------------------------------
# Reading the chain
# ---------------------------------------------------------------------------------------------


@dataclass
class _Step:
    kind: Literal["layer", "batchnorm", "homogeneous", "other"]
    name: str  # how messages call it
    module: _WeightLayer | _BatchNorm | None = None


def _hidden_layers(model: nn.Module) -> list[_HiddenLayer]:
    steps = _chain_steps(model)
    positions = [i for i, step in enumerate(steps) if step.kind == "layer"]
    if not positions:
        raise GraphError(f"Found no nn.Linear / nn.Conv layer in the model; {_SUPPORTED}.")
    modules = [steps[i].module for i in positions]
    if len({id(m) for m in modules}) != len(modules):
        raise GraphError(f"A layer is used twice in the model's forward; {_SUPPORTED}.")
    hidden = []
    for first, second in itertools.pairwise(positions):
        layer, reader = steps[first].module, steps[second].module
        assert isinstance(layer, _WEIGHT_LAYERS) and isinstance(reader, _WEIGHT_LAYERS)
        batchnorm: _BatchNorm | None = None
        for offset, step in enumerate(steps[first + 1 : second]):
            if step.kind == "batchnorm" and offset == 0:
                assert isinstance(step.module, _BATCHNORMS)
                batchnorm = step.module
                if not batchnorm.affine:
                    raise GraphError(
                        f"{step.name} has no affine parameters, so the units of layer "
                        f"{steps[first].name} cannot be rescaled through it; use "
                        f"BatchNorm(affine=True). {_SUPPORTED}."
                    )
            elif step.kind != "homogeneous":
                raise GraphError(
                    f"{step.name} sits between layers {steps[first].name} and "
                    f"{steps[second].name} and is not positively homogeneous (f(c z) = c f(z) "
                    f"for c > 0), so rescaling the units before it would change the network's "
                    f"function. {_SUPPORTED}."
                )
        hidden.append(
            _HiddenLayer(
                steps[first].name,
                layer,
                batchnorm,
                reader,
                _reads(layer, reader, steps[first].name, steps[second].name),
            )
        )
    return hidden


def _reads(
    layer: _WeightLayer, reader: _WeightLayer, name: str, reader_name: str
) -> Literal["linear", "conv", "flatten"]:
    units = int(layer.weight.shape[0])
    if isinstance(reader, nn.Linear):
        if isinstance(layer, nn.Linear):
            if reader.in_features != units:
                raise GraphError(
                    f"Layer {reader_name} reads {reader.in_features} features but layer {name} "
                    f"gives {units}; {_SUPPORTED}."
                )
            return "linear"
        if reader.in_features % units:
            raise GraphError(
                f"Layer {reader_name} reads {reader.in_features} flattened features, not a "
                f"multiple of the {units} channels of layer {name}; {_SUPPORTED}."
            )
        return "flatten"
    if isinstance(layer, nn.Linear) or int(reader.weight.shape[1]) * int(reader.groups) != units:
        raise GraphError(
            f"Convolution {reader_name} does not read the {units} channels of layer {name} "
            f"directly; {_SUPPORTED}."
        )
    return "conv"


def _chain_steps(model: nn.Module) -> list[_Step]:
    """The model's forward as a list of steps, each reading the previous one's output."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:
        raise GraphError(
            f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}); {_SUPPORTED}."
        ) from exc
    features: set[fx.Node] = set()
    head: fx.Node | None = None
    steps: list[_Step] = []
    for node in graph.nodes:
        if node.op == "placeholder":
            if head is not None:
                raise GraphError(f"The model takes several inputs; {_SUPPORTED}.")
            head = node
            features.add(node)
            continue
        if node.op == "get_attr":
            continue
        inputs = [arg for arg in node.all_input_nodes if arg in features]
        if node.op == "output":
            if inputs != [head]:
                raise GraphError(f"The model's output is not its last step; {_SUPPORTED}.")
            continue
        if not inputs:
            continue  # a constant or a shape computation
        name = op_name(node)
        if name in _NOT_FEATURES or (name == "getattr" and node.args[1:2] == ("shape",)):
            continue  # x.size(0), x.shape: metadata, not a feature tensor
        if inputs != [head]:
            raise GraphError(
                f"{_describe(node)} combines or branches feature tensors (e.g. a residual add or "
                f"a concatenation); {_SUPPORTED}."
            )
        features.add(node)
        head = node
        steps.append(_classify(model, node, name))
    return steps


def _classify(model: nn.Module, node: fx.Node, name: str) -> _Step:
    if node.op == "call_module":
        module = model.get_submodule(str(node.target))
        label = f"{str(node.target)!r} ({type(module).__name__})"
        if isinstance(module, _WEIGHT_LAYERS):
            return _Step("layer", label, module)
        if isinstance(module, _BATCHNORMS):
            return _Step("batchnorm", label, module)
        if isinstance(module, _HOMOGENEOUS_MODULES):
            return _Step("homogeneous", label)
        return _Step("other", label)
    if name in _HOMOGENEOUS_OPS:
        return _Step("homogeneous", _describe(node))
    return _Step("other", _describe(node))


def _describe(node: fx.Node) -> str:
    """How the normaliser's messages name a node (shorter than the weight graph's description,
    which adds the function's module and the enclosing submodule)."""
    if node.op == "call_module":
        return f"module {str(node.target)!r}"
    kind = "tensor method" if node.op == "call_method" else "function"
    return f"{kind} {op_name(node)} (fx node {node.name!r})"
