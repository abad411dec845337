"""Following a model's data flow with ``torch.fx`` (symbolic tracing, no example input).

:class:`FxWalker` runs a model's fx graph on :class:`~cluster_tracking.graph.build._Feat` values
instead of tensors: Linear/Conv calls add layers and weight blocks to the builder, elementwise
ops between feature tensors identify units (residual adds), concatenations keep them apart, and
everything that keeps units apart (activations, pooling, normalisations) passes them through.
Models that fx cannot trace (Hugging Face transformers among them) go through
:mod:`cluster_tracking.graph.export` instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from torch import fx, nn

from cluster_tracking.errors import GraphError
from cluster_tracking.graph.build import _BlockSpec, _Builder
from cluster_tracking.graph.features import _OTHER, LAYERS_HINT, _Feat
from cluster_tracking.graph.weights import batchnorm_scale, fetch_attr, weight_array


def module_types(*names: str) -> tuple[type, ...]:
    """The ``torch.nn`` classes of these names that this torch version has (for module tables
    that list classes some torch versions lack, e.g. ``RMSNorm``, ``CircularPad1d``)."""
    return tuple(getattr(nn, name) for name in names if hasattr(nn, name))


CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# Modules that keep units apart: elementwise maps, per-channel scalings and normalisations,
# pooling, padding and resampling of the spatial dims.
_PASS_THROUGH_MODULES = module_types(
    *"ReLU ReLU6 LeakyReLU PReLU RReLU ELU SELU CELU GELU SiLU Mish Sigmoid Tanh Hardtanh".split(),
    *"Hardswish Hardsigmoid Softplus Softsign Softshrink Hardshrink Tanhshrink Threshold".split(),
    *"LogSigmoid Softmax LogSoftmax Softmin Softmax2d Identity Dropout Dropout1d Dropout2d".split(),
    *"Dropout3d AlphaDropout FeatureAlphaDropout LayerNorm GroupNorm RMSNorm".split(),
    *"InstanceNorm1d InstanceNorm2d InstanceNorm3d LocalResponseNorm".split(),
    *"MaxPool1d MaxPool2d MaxPool3d AvgPool1d AvgPool2d AvgPool3d LPPool1d LPPool2d".split(),
    "LPPool3d",
    *"AdaptiveAvgPool1d AdaptiveAvgPool2d AdaptiveAvgPool3d AdaptiveMaxPool1d".split(),
    *"AdaptiveMaxPool2d AdaptiveMaxPool3d FractionalMaxPool2d FractionalMaxPool3d".split(),
    *"Upsample UpsamplingNearest2d UpsamplingBilinear2d ZeroPad1d ZeroPad2d ZeroPad3d".split(),
    *"ConstantPad1d ConstantPad2d ConstantPad3d ReflectionPad1d ReflectionPad2d".split(),
    *"ReflectionPad3d ReplicationPad1d ReplicationPad2d ReplicationPad3d CircularPad1d".split(),
    *"CircularPad2d CircularPad3d".split(),
)

# Functions and tensor methods, by name. Results that are not feature tensors:
_NOT_FEATURES = frozenset(
    "size dim numel ndimension zeros_like ones_like empty_like full_like rand_like randn_like "
    "new_zeros new_ones new_empty new_full new_tensor".split()
)
_METADATA_ATTRS = frozenset("shape dtype device ndim is_cuda requires_grad layout".split())
# Elementwise maps of one feature tensor (extra arguments are constants or parameters), and
# normalisations, pooling, padding and resampling, which keep units apart:
_PASS_THROUGH_OPS = frozenset(
    "relu relu_ relu6 leaky_relu leaky_relu_ elu elu_ selu selu_ celu celu_ gelu silu mish "
    "sigmoid sigmoid_ tanh tanh_ hardtanh hardtanh_ hardswish hardsigmoid softplus softsign "
    "softshrink hardshrink tanhshrink threshold threshold_ logsigmoid rrelu rrelu_ prelu "
    "dropout dropout_ dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout "
    "abs abs_ neg pos exp log log1p sqrt rsqrt square sin cos erf sign reciprocal nan_to_num "
    "clamp clamp_ clamp_min clamp_max clip clip_ contiguous clone detach float double half "
    "bfloat16 to type type_as cpu cuda softmax log_softmax softmin batch_norm layer_norm "
    "group_norm instance_norm rms_norm local_response_norm normalize "
    "max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d lp_pool1d lp_pool2d "
    "lp_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d "
    "adaptive_max_pool2d adaptive_max_pool3d fractional_max_pool2d fractional_max_pool3d "
    "interpolate upsample upsample_nearest upsample_bilinear pad".split()
)
# Elementwise ops that may take two feature tensors (a residual add, a gate):
_ELEMENTWISE_BINARY_OPS = frozenset(
    "add add_ iadd sub sub_ isub rsub mul mul_ imul truediv itruediv div div_ floordiv pow "
    "pow_ ipow maximum minimum fmax fmin".split()
)
_CONCAT_OPS = frozenset({"cat", "concat", "concatenate"})
_REDUCTIONS = frozenset({"mean", "sum", "amax", "amin", "nanmean", "nansum", "logsumexp"})
_FUNCTIONAL_LAYERS = {"linear": 0, "conv1d": 1, "conv2d": 2, "conv3d": 3}


class FxWalker:
    """Runs a model's ``torch.fx`` graph on :class:`_Feat` values instead of tensors."""

    def __init__(self, model: nn.Module, builder: _Builder) -> None:
        self.model = model
        self.builder = builder
        self.env: dict[fx.Node, Any] = {}
        self.spec_of: dict[fx.Node, _BlockSpec] = {}

    def run(self) -> None:
        try:
            graph = fx.symbolic_trace(self.model).graph
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [""])[0][:300]
            raise GraphError(
                f"torch.fx cannot trace {type(self.model).__name__} ({type(exc).__name__}: "
                f"{reason}). Symbolic tracing runs the forward pass without real tensors, so it "
                "stops at Python code that needs their values or shapes; "
                f"{LAYERS_HINT}."
            ) from exc
        for node in graph.nodes:
            self.env[node] = self._step(node)

    def _step(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return _Feat(None, origin="the model input", placeholder=str(node.target))
        if node.op in ("get_attr", "output"):
            return _OTHER
        args = fx.node.map_arg(node.args, self.env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, self.env.__getitem__)
        assert isinstance(args, tuple) and isinstance(kwargs, dict)
        feats = list(_feats_in((args, kwargs)))
        if node.op == "call_module":
            return self._module(node, args, feats)
        if not feats:
            return _OTHER
        return self._op(node, args, kwargs, feats)

    def _module(self, node: fx.Node, args: tuple[Any, ...], feats: list[_Feat]) -> Any:
        name = str(node.target)
        module = self.model.get_submodule(name)
        label = f"layer {name!r} ({type(module).__name__})"
        feat = args[0] if args and isinstance(args[0], _Feat) else None
        if isinstance(module, (nn.Linear, *CONV_MODULES)):
            if feat is None:
                raise GraphError(
                    f"{label} does not read a tensor computed from the model input; {LAYERS_HINT}."
                )
            conv = not isinstance(module, nn.Linear)
            groups = int(module.groups) if isinstance(module, CONV_MODULES) else 1
            weight = weight_array(module.weight, label)
            out, spec = self.builder.weight_layer(
                name, weight, conv=conv, groups=groups, inp=feat, label=label
            )
            self.spec_of[node] = spec
            return out
        if isinstance(module, BATCHNORM_MODULES):
            if feat is None:
                return _OTHER
            return self._batchnorm(node, module, feat, label)
        if isinstance(module, nn.Flatten):
            if feat is None:
                return _OTHER
            return _flatten(feat, module.start_dim, module.end_dim, label)
        if isinstance(module, _PASS_THROUGH_MODULES):
            return feat if feat is not None else _OTHER
        raise GraphError(
            f"The weight graph cannot follow {label}: only nn.Linear and nn.Conv1d/2d/3d layers "
            "carry edges, and this layer is not one that keeps units apart (an activation, "
            f"pooling, dropout, normalisation); {LAYERS_HINT}."
        )

    def _batchnorm(self, node: fx.Node, module: nn.Module, feat: _Feat, label: str) -> _Feat:
        scale = batchnorm_scale(module, label)
        source = node.args[0]
        spec = self.spec_of.get(source) if isinstance(source, fx.Node) else None
        if spec is not None and isinstance(source, fx.Node) and len(source.users) == 1:
            if spec.folded is None:
                self.builder.fold(spec, scale, label, str(node.target))
                return feat
        if feat.nodes is not None and not feat.flat and len(feat.nodes) != len(scale):
            raise GraphError(
                f"{label} normalises {len(scale)} channels but its input ({feat.origin}) has "
                f"{len(feat.nodes)}; {LAYERS_HINT}."
            )
        return feat  # not directly after a layer: a per-channel scaling, passed through

    def _op(
        self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], feats: list[_Feat]
    ) -> Any:
        name = op_name(node)
        desc = _describe(node, name)
        first = args[0] if args and isinstance(args[0], _Feat) else kwargs.get("input")
        if name in _NOT_FEATURES:
            return _OTHER
        if name == "getattr" and len(args) > 1 and args[1] in _METADATA_ATTRS:
            return _OTHER
        if name in _ELEMENTWISE_BINARY_OPS:
            return self.builder.combine(feats, desc)
        if name in _CONCAT_OPS:
            return self._concat(args, kwargs, desc)
        if node.op == "call_function" and name in _FUNCTIONAL_LAYERS:
            return self._functional_layer(node, name, first, desc)
        if not isinstance(first, _Feat):
            raise _unsupported(desc)
        if name in _PASS_THROUGH_OPS:
            return first
        if name == "flatten":
            start = _arg(args, kwargs, 1, "start_dim", 0)
            end = _arg(args, kwargs, 2, "end_dim", -1)
            return _flatten(first, start, end, desc)
        if name in ("view", "reshape"):
            return _reshape(first, args, kwargs, desc)
        if name in ("squeeze", "unsqueeze"):
            return _squeeze(first, name, _arg(args, kwargs, 1, "dim", None), desc)
        if name in _REDUCTIONS:
            dims = _arg(args, kwargs, 1, "dim", kwargs.get("axis"))
            keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
            return _reduce(first, dims, keepdim, desc)
        raise _unsupported(desc)

    def _concat(self, args: tuple[Any, ...], kwargs: dict[str, Any], desc: str) -> _Feat:
        tensors = _arg(args, kwargs, 0, "tensors", None)
        dim = _arg(args, kwargs, 1, "dim", kwargs.get("axis", 0))
        if (
            not isinstance(tensors, (list, tuple))
            or not tensors
            or not all(isinstance(t, _Feat) for t in tensors)
            or not isinstance(dim, int)
        ):
            raise GraphError(
                f"{desc} concatenates something other than tensors computed from the model "
                f"input (or along a computed dim); {LAYERS_HINT}."
            )
        feats = [self.builder.resolve(t, None, desc) for t in tensors]
        axis = _normalise_dim(dim, feats[0])
        if axis is None:
            raise GraphError(
                f"{desc} concatenates along dim {dim}, and the graph cannot tell whether that is "
                f"the channel dim; concatenate along dim=1, or {LAYERS_HINT}."
            )
        if axis == 1:
            return self.builder.concat(feats, desc)
        return self.builder.combine(feats, desc)  # batch or spatial concat: the same units

    def _functional_layer(self, node: fx.Node, name: str, first: Any, desc: str) -> _Feat:
        weight_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if not (isinstance(weight_node, fx.Node) and weight_node.op == "get_attr"):
            raise GraphError(
                f"{desc} applies a weight that is not a parameter of the model, so the graph "
                f"cannot attribute it to a layer; {LAYERS_HINT}."
            )
        if not isinstance(first, _Feat):
            raise _unsupported(desc)
        target = str(weight_node.target)
        layer = target.removesuffix(".weight") or target
        label = f"layer {layer!r} ({desc})"
        weight = weight_array(fetch_attr(self.model, target), label)
        spatial_dims = _FUNCTIONAL_LAYERS[name]
        if weight.ndim != spatial_dims + 2:
            raise GraphError(f"{label} has a weight of shape {weight.shape}; {LAYERS_HINT}.")
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        if not isinstance(groups, int):
            raise GraphError(f"{label} has a computed number of groups; {LAYERS_HINT}.")
        out, spec = self.builder.weight_layer(
            layer, weight, conv=spatial_dims > 0, groups=groups, inp=first, label=label
        )
        self.spec_of[node] = spec
        return out


def _feats_in(value: Any) -> Iterable[_Feat]:
    if isinstance(value, _Feat):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _feats_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _feats_in(item)
    elif isinstance(value, slice):
        yield from _feats_in((value.start, value.stop, value.step))


def op_name(node: fx.Node) -> str:
    """The name of what an fx node calls: the method name for ``call_method``, else the
    function's ``__name__`` (``"relu"``, ``"add"``, ``"flatten"``) or the target as a string."""
    if node.op == "call_method":
        return str(node.target)
    return str(getattr(node.target, "__name__", node.target))


def _describe(node: fx.Node, name: str) -> str:
    if node.op == "call_method":
        what = f"tensor method .{name}()"
    else:
        module = str(getattr(node.target, "__module__", "") or "")
        module = {"_operator": "operator", "torch._C._nn": "torch.nn.functional"}.get(
            module, "torch" if module.startswith("torch._C") else module
        )
        what = f"function {module}.{name}" if module else f"function {name}"
    stack = node.meta.get("nn_module_stack")
    where = f" inside {list(stack)[-1]!r}" if stack else ""
    return f"{what} (fx node {node.name!r}{where})"


def _unsupported(desc: str) -> GraphError:
    return GraphError(
        f"The weight graph cannot follow {desc}: it is not an elementwise, pooling, "
        "normalisation, flatten, add or concatenation step, and it may mix units without "
        f"Linear/Conv weights; {LAYERS_HINT}."
    )


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], position: int, name: str, default: Any):
    if len(args) > position:
        return args[position]
    return kwargs.get(name, default)


def _normalise_dim(dim: int, feat: _Feat) -> int | None:
    """A non-negative dim of ``feat``'s tensor, or None when its rank is unknown."""
    if dim >= 0:
        return dim
    if feat.flat:
        return 2 + dim
    if feat.spatial is None:
        return None
    return 2 + feat.spatial + dim


def _flatten(feat: _Feat, start: Any, end: Any, desc: str) -> _Feat:
    if not isinstance(start, int) or not isinstance(end, int):
        raise GraphError(f"{desc} flattens computed dims; {LAYERS_HINT}.")
    first, last = _normalise_dim(start, feat), _normalise_dim(end, feat)
    to_end = end == -1 or (
        last is not None and feat.spatial is not None and last == feat.spatial + 1
    )
    if feat.nodes is None:  # the raw model input: its layer is what the first reader reads
        return replace(feat, flat=first is not None and first <= 1, spatial=None)
    if first is None or not to_end:
        if start == -1 or first == last:
            return feat
        raise GraphError(
            f"{desc} flattens only some dims, and the graph cannot tell whether they include "
            f"the channel dim; use flatten(1), or {LAYERS_HINT}."
        )
    if first <= 1:
        if feat.flat or feat.spatial == 0:
            return feat  # already one feature dim
        return replace(feat, flat=True, spatial=0, origin=f"{feat.origin}, flattened")
    if feat.flat:
        return feat
    return replace(feat, spatial=first - 1)


def _reshape(feat: _Feat, args: tuple[Any, ...], kwargs: dict[str, Any], desc: str) -> _Feat:
    shape: Any = args[1:] if len(args) > 1 else kwargs.get("shape", ())
    if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
        shape = shape[0]
    if len(shape) == 1 and not isinstance(shape[0], int):
        raise GraphError(f"{desc} reshapes to a computed shape; {LAYERS_HINT}.")
    if len(shape) <= 2:  # [batch, features]: a flatten
        return _flatten(feat, 0 if len(shape) == 1 else 1, -1, desc)
    if feat.nodes is None:
        return replace(feat, flat=False, spatial=len(shape) - 2)
    channels = shape[1]
    if feat.flat or (isinstance(channels, int) and channels not in (-1, len(feat.nodes))):
        raise GraphError(
            f"{desc} reshapes the {len(feat.nodes)} units of {feat.origin} into another channel "
            f"layout; the weight graph cannot follow that; {LAYERS_HINT}."
        )
    return replace(feat, spatial=len(shape) - 2)


def _squeeze(feat: _Feat, name: str, dim: Any, desc: str) -> _Feat:
    if feat.nodes is None or dim is None:
        return replace(feat, spatial=None)
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    if feat.flat or not all(isinstance(d, int) for d in dims):
        raise GraphError(f"{desc} changes the dims of {feat.origin}; {LAYERS_HINT}.")
    if name == "unsqueeze":
        probe = replace(feat, spatial=None if feat.spatial is None else feat.spatial + 1)
    else:
        probe = feat
    axes = [_normalise_dim(d, probe) for d in dims]
    if any(axis in (0, 1) for axis in axes):
        raise GraphError(
            f"{desc} moves the channel dim of {feat.origin} (dim 1); the weight graph cannot "
            f"follow that; {LAYERS_HINT}."
        )
    if None in axes or feat.spatial is None:
        return replace(feat, spatial=None)
    step = len(dims) if name == "unsqueeze" else -len(dims)
    return replace(feat, spatial=max(feat.spatial + step, 0))


def _reduce(feat: _Feat, dims: Any, keepdim: bool, desc: str) -> _Feat:
    if feat.nodes is None:
        return replace(feat, spatial=None)
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        raise GraphError(
            f"{desc} reduces over all dims (or computed ones), channels included; reduce over the "
            f"spatial dims only (e.g. x.mean((2, 3))), or {LAYERS_HINT}."
        )
    axes = [_normalise_dim(d, feat) for d in dims]
    if feat.flat or any(axis in (0, 1) for axis in axes):
        raise GraphError(
            f"{desc} reduces over the batch or channel dim of {feat.origin}; reduce over the "
            f"spatial dims only (e.g. x.mean((2, 3))), or {LAYERS_HINT}."
        )
    if keepdim:
        return feat
    if None in axes or feat.spatial is None:
        return replace(feat, spatial=None)
    return replace(feat, spatial=max(feat.spatial - len(dims), 0))
