"""The weight graph as data: weight blocks, node layers and the sparse adjacency.

Filan et al. (2021), section 2: nodes are neurons (channels, for convolutions), and the edge
between two neurons of consecutive layers weighs the magnitude of the weight joining them. A
:class:`WeightGraph` holds the graph's node layers, its symmetric sparse adjacency and the
:class:`EdgeBlock` s (one per weight tensor) the edges come from; null models replace the blocks'
weights and keep the topology.

These types need numpy and scipy only (no torch), so worker processes that partition null
networks start fast; :func:`cluster_tracking.graph.weight_graph` builds them from a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import scipy.sparse as sp

from cluster_tracking.errors import GraphError
from cluster_tracking.graph.degrees import _kernel_slice_norms, block_degrees

BlockKind = Literal["linear", "conv", "flatten"]
KernelNorm = Literal["l1", "l2", "l1_induced"]
Preset = Literal["default", "filan2021"]


@dataclass(frozen=True)
class WeightSource:
    """How a block's effective weight is computed from the model's parameters, beyond the plain
    ``weight`` (read again at every due step by :func:`~cluster_tracking.graph.live_weights`).

    In this order: the parameter is read; ``transposed`` swaps its first two axes (GPT-2's
    ``Conv1D`` and ``addmm`` store ``[in, out]``; ``ConvTranspose`` stores ``[in, out, *kernel]``);
    ``gates`` sums the magnitudes of that many stacked ``[gates * out, in]`` row blocks (the four
    gates of an LSTM, three of a GRU); ``columns`` reorders the input columns (a flattened
    feature map read in another order than channel-major); each ``(parameter, index)`` of
    ``input_scales`` multiplies input column ``i`` by ``|offset + parameter[index[i]]|`` (a
    LayerNorm or RMSNorm affine weight folded into the layers that read it; Gemma's RMSNorm
    scales by ``1 + weight``, an offset of 1) and each of ``output_scales``
    output row ``j`` by ``|parameter[index[j]]|`` (a per-channel scale such as LayerScale applied
    to the layer's output).
    """

    parameter: str
    transposed: bool = False
    gates: int = 1
    columns: np.ndarray | None = None
    input_scales: tuple[tuple[str, np.ndarray, float], ...] = ()
    output_scales: tuple[tuple[str, np.ndarray, float], ...] = ()


@dataclass(frozen=True)
class EdgeBlock:
    """One weight tensor of the network and the nodes it joins.

    ``weight`` is the *effective* tensor (BatchNorm already folded in), float64 (float32 from the
    bounded-memory reader, :mod:`~cluster_tracking.graph.lazy`), in torch layout:
    ``[out, in]`` for ``linear``, ``[out, in / groups, *kernel]`` for ``conv`` and ``[out, C * S]``
    for ``flatten`` (a linear layer reading a flattened ``[C, *spatial]`` feature map,
    channel-major, so flattened input i comes from channel ``i // S``). ``src`` holds the node
    index of each input unit/channel and ``dst`` that of each output unit/channel, in the graph's
    node numbering. ``name`` is the layer's name (``"name#2"`` for a module's second call) and
    ``batchnorm`` the qualified name of the BatchNorm folded into ``weight``, if any (the
    regulariser recomputes the effective weight from both modules' live parameters).
    ``source`` says how ``weight`` comes from the parameters when it is more than the module's
    ``weight`` (``None``: ``model.get_submodule(name).weight``, BatchNorm folded).
    ``magnitude`` says that ``weight`` holds the magnitudes ``|W|`` already, signs dropped (the
    bounded-memory reader keeps one float32 copy, 4 bytes per edge): the edge weights are then
    ``weight`` itself, not a copy of its absolute values.
    Null models (shuffles) replace ``weight`` and keep everything else.
    """

    name: str
    kind: BlockKind
    weight: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    groups: int = 1
    norm: KernelNorm = "l1"
    batchnorm: str | None = None
    source: WeightSource | None = None
    magnitude: bool = False

    def edge_weights(self) -> np.ndarray:
        """Dense ``[len(dst), len(src)]`` matrix of edge weights between output and input nodes
        (``weight`` itself, not a copy, for a ``linear`` block of magnitudes)."""
        magnitude = self.weight if self.magnitude else np.abs(self.weight)
        n_out, n_in = len(self.dst), len(self.src)
        if self.kind == "linear":
            return magnitude
        if self.kind == "flatten":
            return magnitude.reshape(n_out, n_in, -1).sum(axis=2)
        per_slice = _kernel_slice_norms(magnitude, self.norm)  # [out, in / groups]
        if self.groups == 1:
            return per_slice
        # Grouped convolution: output channel b only reads the input channels of its own group.
        edges = np.zeros((n_out, n_in))
        rows, cols = self.group_pattern()
        edges[rows, cols] = per_slice
        return edges

    def group_pattern(self) -> tuple[np.ndarray, np.ndarray]:
        """``[out, in / groups]`` row and column indices, into the dense ``[out, in]`` edge matrix,
        of the input channels each output channel of a grouped convolution reads."""
        n_out, n_in = len(self.dst), len(self.src)
        out_per_group, in_per_group = n_out // self.groups, n_in // self.groups
        group_of_out = np.arange(n_out) // out_per_group
        cols = group_of_out[:, None] * in_per_group + np.arange(in_per_group)[None, :]
        rows = np.broadcast_to(np.arange(n_out)[:, None], cols.shape)
        return rows, cols

    def _edge_list(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Non-zero edges as ``(dst node, src node, weight)`` arrays, without densifying grouped
        convolutions (a depthwise conv over C channels has C edges, not C * C)."""
        if self.kind == "conv" and self.groups > 1:
            per_slice = _kernel_slice_norms(np.abs(self.weight), self.norm)
            rows, cols = self.group_pattern()
            keep = per_slice != 0
            return self.dst[rows[keep]], self.src[cols[keep]], per_slice[keep]
        edges = self.edge_weights()
        out_idx, in_idx = np.nonzero(edges)
        return self.dst[out_idx], self.src[in_idx], edges[out_idx, in_idx]


@dataclass(frozen=True)
class WeightGraph:
    """The weight graph of a network (Filan et al. 2021, section 2).

    Attributes:
        layer_names: one name per node layer, from the input (``"input"``) to the output.
        widths: number of nodes of each layer, in the same order.
        adjacency: symmetric ``[n_nodes, n_nodes]`` scipy sparse matrix of edge weights (float64,
            no self-loops), nodes in the public order (layer by layer, by index inside a layer).
        blocks: the weight tensors the edges come from, in the order they were found.
        assembled: whether ``adjacency`` holds the graph's edges. ``False`` for the graphs of
            :func:`~cluster_tracking.graph.weight_topology` and of the bounded-memory reader
            (:func:`~cluster_tracking.graph.lazy.safetensors_graph`), whose ``adjacency`` is an
            empty ``[n, n]`` placeholder: :attr:`degrees`, :func:`~cluster_tracking.ncut`,
            spectral clustering and the measurement work from the weight blocks instead, and
            :meth:`assemble` makes the sparse adjacency when it is wanted (a plot).
        merged: layers whose nodes were all identified with nodes of earlier layers by residual
            additions (and so are left out of ``layer_names``), mapped to the layer that holds
            their nodes (several holders, when the nodes went to more than one layer, are joined
            by ``", "``). A layer only partly identified keeps its remaining nodes, in order.
        preset: the conventions used (``"default"`` or ``"filan2021"``).
    """

    layer_names: tuple[str, ...]
    widths: tuple[int, ...]
    adjacency: sp.csr_array
    blocks: tuple[EdgeBlock, ...]
    merged: dict[str, str] = field(default_factory=dict)
    preset: str = "default"
    assembled: bool = True

    @property
    def n_nodes(self) -> int:
        """Total number of nodes."""
        return int(sum(self.widths))

    @property
    def offsets(self) -> np.ndarray:
        """Index of each layer's first node; ``offsets[-1] == n_nodes``."""
        return np.concatenate([[0], np.cumsum(self.widths)]).astype(np.int64)

    @property
    def node_layer(self) -> np.ndarray:
        """Layer index of every node, shape ``[n_nodes]``."""
        return np.repeat(np.arange(len(self.widths)), self.widths)

    @property
    def degrees(self) -> np.ndarray:
        """Weighted degree of every node (sum of its edge weights), shape ``[n_nodes]``."""
        if not self.assembled:
            return block_degrees(self.blocks, self.n_nodes)
        return np.asarray(self.adjacency.sum(axis=1)).ravel()

    def assemble(self) -> WeightGraph:
        """This graph with its sparse adjacency assembled (itself when it has it already);
        about 24 bytes per edge more."""
        if self.assembled:
            return self
        adjacency = assemble_adjacency(self.blocks, self.n_nodes)
        return replace(self, adjacency=adjacency, assembled=True)

    def weights(self) -> list[np.ndarray]:
        """The effective weight tensors, one per block (what the null models shuffle)."""
        return [block.weight for block in self.blocks]

    def with_weights(self, weights: Sequence[np.ndarray]) -> WeightGraph:
        """The same topology with new weight tensors (one per block, same shapes)."""
        if len(weights) != len(self.blocks):
            raise GraphError(
                f"with_weights got {len(weights)} tensors for {len(self.blocks)} weight blocks; "
                "pass one tensor per block, in the order of graph.blocks."
            )
        blocks = []
        for block, weight in zip(self.blocks, weights, strict=True):
            array = np.asarray(weight, dtype=np.float64)
            if array.shape != block.weight.shape:
                raise GraphError(
                    f"with_weights: tensor for {block.name!r} has shape {array.shape}, "
                    f"expected {block.weight.shape}."
                )
            blocks.append(replace(block, weight=array))
        adjacency = assemble_adjacency(blocks, self.n_nodes)
        return replace(self, adjacency=adjacency, blocks=tuple(blocks), assembled=True)


def assemble_adjacency(blocks: Sequence[EdgeBlock], n_nodes: int) -> sp.csr_array:
    """Symmetric sparse adjacency of ``n_nodes`` nodes from the blocks' edge weights.

    Parallel edges (the same pair of nodes joined by several tensors, e.g. after a residual add
    identified channels) add up; self-loops are dropped, since a node's edge to itself can never be
    cut and the normalised Laplacian of spectral clustering ignores it.
    """
    index_dtype = np.int32 if n_nodes < np.iinfo(np.int32).max else np.int64
    rows, cols, values = [], [], []
    for block in blocks:
        dst, src, weight = block._edge_list()
        keep = dst != src
        if not keep.all():
            dst, src, weight = dst[keep], src[keep], weight[keep]
        rows.append(dst.astype(index_dtype, copy=False))
        cols.append(src.astype(index_dtype, copy=False))
        values.append(weight.astype(np.float64, copy=False))
    if not rows:
        return sp.csr_array((n_nodes, n_nodes))
    # Each edge once (dst, src), then A = U + U^T: both orientations without concatenating the
    # edge list twice (the memory peak of large graphs), and parallel edges summed.
    r = np.concatenate(rows)
    del rows
    c = np.concatenate(cols)
    del cols
    v = np.concatenate(values)
    del values
    one_way = sp.coo_array((v, (r, c)), shape=(n_nodes, n_nodes)).tocsr()
    del r, c, v
    adjacency = sp.csr_array(one_way + one_way.T)
    adjacency.sum_duplicates()
    return adjacency
