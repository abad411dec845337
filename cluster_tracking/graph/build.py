"""The provisional weight graph that the tracers and chain readers fill in.

Layers of provisional node ids, weight blocks between them, and a union-find over the ids for
the units that residual adds (and gates) identify; :meth:`_Builder.finish` merges the
identified nodes, numbers them in the public order (layer by layer from the input, by index
inside a layer) and makes the :class:`~cluster_tracking.graph.types.WeightGraph`.
Needs numpy and scipy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import scipy.sparse as sp

from cluster_tracking.errors import GraphError
from cluster_tracking.graph.features import LAYERS_HINT, _chain_advice, _Feat
from cluster_tracking.graph.numbering import NodeNumbering, number_nodes
from cluster_tracking.graph.types import (
    BlockKind,
    EdgeBlock,
    KernelNorm,
    Preset,
    WeightGraph,
    WeightSource,
    assemble_adjacency,
)


@dataclass
class _Layer:
    name: str
    kind: Literal["input", "linear", "conv"]
    start: int  # first provisional node id
    width: int

    @property
    def end(self) -> int:
        return self.start + self.width


@dataclass
class _BlockSpec:
    name: str
    kind: BlockKind
    weight: np.ndarray
    src: np.ndarray  # provisional node ids
    dst: np.ndarray
    groups: int
    folded: str | None = None  # the BatchNorm folded into it (as messages call it)
    batchnorm: str | None = None  # that BatchNorm's module name (state_dict prefix)
    source: WeightSource | None = None  # how the weight comes from parameters, if not plainly
    magnitude: bool = False  # weight holds |W| already (the bounded-memory reader)


class _Builder:
    """Collects layers and weight blocks over provisional node ids, then numbers the nodes."""

    def __init__(self, norm: KernelNorm) -> None:
        self.norm = norm
        self.layers: list[_Layer] = []
        self.parent: list[int] = []
        self.specs: list[_BlockSpec] = []
        self.inputs: dict[str, np.ndarray] = {}
        self._names: set[str] = set()
        # Layers left out when no weight block reaches their nodes (an embedding whose output
        # is only a bias of attention scores, say).
        self.optional: set[str] = set()

    def new_layer(
        self, name: str, kind: Literal["input", "linear", "conv"], width: int
    ) -> tuple[str, np.ndarray]:
        unique, call = name, 2
        while unique in self._names:  # a module called again gets a layer per call
            unique, call = f"{name}#{call}", call + 1
        self._names.add(unique)
        start = len(self.parent)
        self.parent.extend(range(start, start + width))
        self.layers.append(_Layer(unique, kind, start, width))
        return unique, np.arange(start, start + width, dtype=np.int64)

    def _find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            root_x, root_y = self._find(x), self._find(y)
            if root_x != root_y:
                self.parent[max(root_x, root_y)] = min(root_x, root_y)

    def resolve(self, feat: _Feat, width: int | None, reader: str) -> _Feat:
        """``feat`` with its nodes; a model input read for the first time gets its layer here."""
        if feat.nodes is not None:
            return feat
        placeholder = str(feat.placeholder)
        bound = self.inputs.get(placeholder)
        if bound is not None:
            return replace(feat, nodes=bound)
        if width is None:
            raise GraphError(
                f"{reader} combines the model input {placeholder!r} with other tensors before any "
                f"Linear/Conv layer reads it, so the graph cannot tell its width; {LAYERS_HINT}."
            )
        _, nodes = self.new_layer(f"input.{placeholder}", "input", width)
        self.inputs[placeholder] = nodes
        return replace(feat, nodes=nodes, flat=False)

    def add_block(
        self,
        name: str,
        kind: BlockKind,
        weight: np.ndarray,
        src: np.ndarray,
        *,
        groups: int = 1,
        source: WeightSource | None = None,
        dst: np.ndarray | None = None,
    ) -> _BlockSpec:
        """A weight block from nodes ``src`` to a new layer named ``name`` (or to the existing
        nodes ``dst``: a recurrent layer's hidden-to-hidden weights)."""
        if dst is None:
            layer_kind: Literal["linear", "conv"] = "conv" if kind == "conv" else "linear"
            name, dst = self.new_layer(name, layer_kind, weight.shape[0])
        spec = _BlockSpec(name, kind, weight, src, dst, groups, source=source)
        self.specs.append(spec)
        return spec

    def weight_layer(
        self,
        name: str,
        weight: np.ndarray,
        *,
        conv: bool,
        groups: int,
        inp: _Feat,
        label: str,
        source: WeightSource | None = None,
    ) -> tuple[_Feat, _BlockSpec]:
        """Add a Linear/Conv layer reading ``inp``: its output nodes and its edge block."""
        n_out = weight.shape[0]
        kind: BlockKind
        if conv:
            n_in = weight.shape[1] * groups
            feat = self.resolve(inp, n_in, label)
            assert feat.nodes is not None
            width = len(feat.nodes)
            if feat.flat:
                raise GraphError(
                    f"{label} is a convolution reading a flattened tensor (from {feat.origin}); "
                    f"the weight graph cannot follow that; {LAYERS_HINT}."
                )
            if width != n_in:
                raise GraphError(
                    f"{label} reads {n_in} input channels but {feat.origin} gives it {width}; "
                    f"the layers do not chain. {_chain_advice(label)}"
                )
            kind = "conv"
        else:
            n_in = weight.shape[1]
            feat = self.resolve(inp, n_in, label)
            assert feat.nodes is not None
            width = len(feat.nodes)
            if width == n_in and (feat.flat or not feat.spatial):
                kind = "linear"
            elif feat.flat:
                if n_in % width:
                    raise GraphError(
                        f"{label} reads {n_in} flattened features but {feat.origin} has {width} "
                        f"channels, and {n_in} is not a multiple of {width}, so the features "
                        f"cannot be attributed to channels. {_chain_advice(label)}"
                    )
                kind = "flatten"
            elif feat.spatial:
                raise GraphError(
                    f"{label} is applied to a feature map with spatial dims (from "
                    f"{feat.origin}) without flattening or pooling it first, so it mixes "
                    f"positions, not channels; the weight graph cannot follow that; "
                    f"{LAYERS_HINT}."
                )
            else:
                raise GraphError(
                    f"{label} reads {n_in} features but {feat.origin} gives it {width}; the "
                    f"layers do not chain. {_chain_advice(label)}"
                )
        name, out_nodes = self.new_layer(name, "conv" if conv else "linear", n_out)
        spec = _BlockSpec(
            name, kind, weight, feat.nodes, out_nodes, groups if conv else 1, source=source
        )
        self.specs.append(spec)
        spatial = weight.ndim - 2 if conv else 0
        return _Feat(out_nodes, origin=label, spatial=spatial), spec

    def fold(
        self, spec: _BlockSpec, scale: np.ndarray, label: str, name: str | None = None
    ) -> None:
        """Fold a BatchNorm's per-output-unit scale into the weights of the layer before it."""
        n_out = spec.weight.shape[0]
        if len(scale) != n_out:
            raise GraphError(
                f"{label} normalises {len(scale)} channels but follows layer {spec.name!r} with "
                f"{n_out} outputs; they cannot be folded. {_chain_advice(label)}"
            )
        factor = scale.astype(spec.weight.dtype, copy=False)  # float32 weights stay float32
        spec.weight = spec.weight * factor.reshape((-1,) + (1,) * (spec.weight.ndim - 1))
        spec.folded = label
        spec.batchnorm = name

    def combine(self, feats: Sequence[_Feat], desc: str) -> _Feat:
        """An elementwise op between feature tensors: units at the same index are one node."""
        feats = [
            replace(f, nodes=self.inputs[f.placeholder])
            if f.nodes is None and f.placeholder in self.inputs
            else f
            for f in feats
        ]
        known = [len(f.nodes) for f in feats if f.nodes is not None]
        if not known:
            if len({f.placeholder for f in feats}) == 1:
                return feats[0]  # the model input with itself, before any layer reads it
            raise GraphError(
                f"{desc} combines model inputs before any Linear/Conv layer reads them, so the "
                f"graph cannot tell their widths; {LAYERS_HINT}."
            )
        width = max(known)
        resolved = [self.resolve(f, width, desc) for f in feats]
        wide = [f for f in resolved if f.nodes is not None and len(f.nodes) == width]
        narrow = [f for f in resolved if f.nodes is not None and len(f.nodes) != width]
        if any(f.nodes is not None and len(f.nodes) != 1 for f in narrow):
            shapes = ", ".join(
                f"{len(f.nodes)} from {f.origin}" for f in resolved if f.nodes is not None
            )
            raise GraphError(
                f"{desc} combines tensors with different numbers of units/channels ({shapes}); "
                f"the weight graph cannot tell which units it joins; {LAYERS_HINT}."
            )
        first = wide[0]
        assert first.nodes is not None
        for other in wide[1:]:
            assert other.nodes is not None
            if other.flat != first.flat:
                raise GraphError(
                    f"{desc} combines a flattened feature map with an unflattened tensor "
                    f"({first.origin}, {other.origin}); {LAYERS_HINT}."
                )
            self.union(first.nodes, other.nodes)
        spatial = next((f.spatial for f in wide if f.spatial is not None), None)
        return _Feat(first.nodes, origin=f"the output of {desc}", flat=first.flat, spatial=spatial)

    def concat(self, feats: Sequence[_Feat], desc: str) -> _Feat:
        """A concatenation along the channel dim: the operands' nodes side by side, kept apart."""
        resolved = [self.resolve(f, None, desc) for f in feats]
        if any(f.flat for f in resolved):
            raise GraphError(
                f"{desc} concatenates flattened feature maps, whose channels a following Linear "
                f"layer cannot be attributed to; concatenate before flattening, or {LAYERS_HINT}."
            )
        nodes = np.concatenate([f.nodes for f in resolved if f.nodes is not None])
        spatial = next((f.spatial for f in resolved if f.spatial is not None), None)
        return _Feat(nodes, origin=f"the output of {desc}", spatial=spatial)

    def finish(self, preset: Preset, what: str, *, assemble: bool = True) -> WeightGraph:
        """Merge identified nodes, number them in the public order and assemble the adjacency
        (``assemble=False``: an empty one)."""
        if not self.specs:
            raise GraphError(
                f"Found no nn.Linear or nn.Conv1d/2d/3d layer in {what} on the path from its "
                "input to its output, and a weight graph is made of their weights; measure a "
                "network built from such layers (or pass layers=[...] naming them)."
            )
        is_cnn = any(spec.kind == "conv" for spec in self.specs)
        filan = preset == "filan2021" and is_cnn
        # Layer order: the model inputs first, then the layers in data-flow order.
        order = sorted(range(len(self.layers)), key=lambda i: self.layers[i].kind != "input")
        self.layers = [self.layers[i] for i in order]
        names = self._final_names()
        kept = self._kept_layers(filan)
        n_provisional = len(self.parent)
        roots = np.fromiter(
            (self._find(i) for i in range(n_provisional)), dtype=np.int64, count=n_provisional
        )
        numbering = number_nodes(
            [layer.start for layer in self.layers],
            [layer.width for layer in self.layers],
            roots,
            kept,
        )
        layer_names, layer_widths, merged = self._final_layers(names, kept, numbering)
        blocks = self._edge_blocks(numbering.final, filan)
        if not blocks:
            raise GraphError(
                f"preset='filan2021' keeps only convolution-to-convolution edges, and {what} has "
                "no convolution reading another one's output; use preset='default'."
            )
        if not any(np.any(block.weight) for block in blocks):
            raise GraphError(
                f"Every weight of {what} that the graph reads is zero, so it has no edges to "
                "cluster; measure a trained or initialised network."
            )
        n_nodes = int(sum(layer_widths))
        return WeightGraph(
            layer_names=tuple(layer_names),
            widths=tuple(layer_widths),
            adjacency=(
                assemble_adjacency(blocks, n_nodes)
                if assemble
                else sp.csr_array((n_nodes, n_nodes))
            ),
            blocks=tuple(blocks),
            merged=merged,
            preset=preset,
            assembled=assemble,
        )

    def _kept_layers(self, filan: bool) -> np.ndarray:
        """Whether each layer is kept: under ``filan2021`` (a CNN) the convolutions only, and an
        optional layer only when a weight block reaches one of its nodes."""
        touched = {
            self._find(int(i)) for spec in self.specs for i in np.concatenate([spec.src, spec.dst])
        }
        return np.array(
            [
                (layer.kind == "conv" or not filan)
                and (
                    layer.name not in self.optional
                    or any(self._find(i) in touched for i in range(layer.start, layer.end))
                )
                for layer in self.layers
            ]
        )

    def _final_layers(
        self, names: list[str], kept: np.ndarray, numbering: NodeNumbering
    ) -> tuple[list[str], list[int], dict[str, str]]:
        """``(layer names, widths, merged)`` of the graph: the kept layers that hold nodes, and
        those whose nodes all went to earlier layers, mapped to the layers holding them."""
        layer_names: list[str] = []
        layer_widths: list[int] = []
        merged: dict[str, str] = {}
        stride = numbering.stride
        for i, layer in enumerate(self.layers):
            if not kept[i]:
                continue
            if numbering.final_widths[i] > 0:
                layer_names.append(names[i])
                layer_widths.append(int(numbering.final_widths[i]))
                continue
            own = numbering.holder_key[layer.start : layer.start + layer.width] // stride
            holders = dict.fromkeys(names[h] for h in own.tolist())
            merged[names[i]] = ", ".join(holders)
        return layer_names, layer_widths, merged

    def _edge_blocks(self, final: np.ndarray, filan: bool) -> list[EdgeBlock]:
        """The weight blocks in final node numbers (under ``filan2021``, those between kept
        convolutions only)."""
        blocks = []
        for spec in self.specs:
            src, dst = final[spec.src], final[spec.dst]
            if (src < 0).any() or (dst < 0).any():
                continue  # filan2021: an edge to the input or a Linear layer
            norm: KernelNorm = "l1_induced" if filan and spec.kind == "conv" else self.norm
            blocks.append(
                EdgeBlock(
                    spec.name,
                    spec.kind,
                    spec.weight,
                    src,
                    dst,
                    spec.groups,
                    norm,
                    spec.batchnorm,
                    spec.source,
                    spec.magnitude,
                )
            )
        return blocks

    def _final_names(self) -> list[str]:
        """Layer names, the model input called ``"input"`` when there is one."""
        inputs = [layer for layer in self.layers if layer.name.startswith("input.")]
        names = [layer.name for layer in self.layers]
        if len(inputs) == 1 and "input" not in self._names:
            names[self.layers.index(inputs[0])] = "input"
        return names
