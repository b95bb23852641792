"""Torch-Pruning's dependency graph, with the fixes prunecp needs to trust its channel mappings.

Torch-Pruning traces a model with autograd and maps channel indices through every reshape, split and
concatenation. Where its mapping is wrong or gives up, the fixes here either correct it from what the
traced forward pass saw (concatenation widths, split part order and offsets) or mark the operation
*opaque*, so that the groups whose channels pass through it are kept whole (see
:class:`prunecp_cli.surgery.groups.ModelGraph`). Each fix is installed once per process and behaves
exactly as before on operations Torch-Pruning maps correctly.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import torch
from torch import nn


def build_dependency(model: nn.Module, example: torch.Tensor):
    """Torch-Pruning's dependency graph of ``model``, and the reshapes it could not follow.

    Torch-Pruning maps channel indices through a reshape only for a flatten (4-D to 2-D) or its
    inverse; a reshape that splits the channel dimension (a channel shuffle: view to 5-D,
    transpose, view back, as in ShuffleNet) makes its index mapping fail (ZeroDivisionError) or
    be skipped. Such a reshape is left unmapped and returned, so that every group whose channels
    pass through it is kept whole instead of re-wired wrongly.
    """
    import torch_pruning as tp

    _tolerate_channel_reshapes()
    _order_split_outputs()
    with torch.enable_grad(), _recorded_shapes():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    return dg, getattr(dg, "_prunecp_opaque", set())


#: Channel widths of the parts of every ``torch.cat`` on dim 1 seen while tracing, by the output's autograd node.
_CONCAT_WIDTHS: dict[Any, list[int]] = {}
#: Input and output ranks of every ``view``/``reshape`` seen while tracing, by the output's autograd node.
_RESHAPE_RANKS: dict[Any, tuple[int, int]] = {}


@contextlib.contextmanager
def _recorded_shapes():
    """Record what Torch-Pruning would otherwise infer, badly, while it traces the model.

    * The part widths of channel concatenations: it infers them by walking the graph back
      recursively, and on DPN's dual-path blocks the walk gives up (``None``) after minutes. The
      widths seen in the traced forward pass are exact and are handed to it instead.
    * The ranks of reshapes: its reshape mapping is meant for a flatten (4-D to 2-D); a channel
      shuffle's view to 5-D was mapped as a flatten with a stride, which multiplied every index
      list it passed and cost ShuffleNet minutes per trace before the group was kept whole anyway.

    See :func:`_tolerate_channel_reshapes` for where the records are used.
    """
    cat, view, reshape = torch.cat, torch.Tensor.view, torch.Tensor.reshape

    def recording_cat(tensors, dim=0, *args, **kwargs):
        out = cat(tensors, dim, *args, **kwargs)
        if out.grad_fn is not None and out.dim() >= 2 and dim in (1, 1 - out.dim()):
            _CONCAT_WIDTHS[out.grad_fn] = [int(t.shape[1]) for t in tensors]
        return out

    def recorder(method):
        def recording(self, *args, **kwargs):
            out = method(self, *args, **kwargs)
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                _RESHAPE_RANKS[out.grad_fn] = (self.dim(), out.dim())
            return out
        return recording

    torch.cat, torch.Tensor.view, torch.Tensor.reshape = recording_cat, recorder(view), recorder(reshape)
    try:
        yield
    finally:
        torch.cat, torch.Tensor.view, torch.Tensor.reshape = cat, view, reshape
        _CONCAT_WIDTHS.clear()
        _RESHAPE_RANKS.clear()


def _tolerate_channel_reshapes() -> None:
    """Make Torch-Pruning's reshape and concatenation index mappings record, not crash on, what they cannot map.

    Torch-Pruning recomputes index mappings whenever it forms a group, so the replacement stays
    installed (once per process); on every reshape it can map it behaves exactly as before.
    """
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_reshape_index_mapping
    if getattr(original, "_prunecp", False):
        return

    def tolerant(graph, node):
        opaque = graph.__dict__.setdefault("_prunecp_opaque", set())
        if node in opaque:
            return None  # found at trace time; Torch-Pruning re-maps on every group it forms
        sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", getattr(node.grad_fn, "_saved_self_sizes", None))
        if max(_RESHAPE_RANKS.get(node.grad_fn, (0, 0))) > 4 or (sizes is not None and len(sizes) not in (1, 2, 4)):
            opaque.add(node)  # Torch-Pruning skips it: a channel split (5-D) it cannot map
            return None
        try:
            return original(graph, node)
        except ZeroDivisionError:
            opaque.add(node)
            return None

    tolerant._prunecp = True
    index_mapping.update_reshape_index_mapping = tolerant

    def tolerant_concat(graph, node):
        widths = _CONCAT_WIDTHS.get(node.grad_fn)
        if getattr(node.module, "concat_sizes", None) is None and widths and len(widths) == len(node.inputs):
            node.module.concat_sizes = list(widths)
        try:
            return original_concat(graph, node)
        except TypeError:  # a part whose width it could not infer (DPN's dual-path concatenations)
            graph.__dict__.setdefault("_prunecp_opaque", set()).add(node)
            return None

    original_concat = index_mapping.update_concat_index_mapping
    tolerant_concat._prunecp = True
    index_mapping.update_concat_index_mapping = tolerant_concat


def _split_output_number(split_fn: Any, consumer: Any) -> int | None:
    """Which output of the split whose autograd node is ``split_fn`` the node ``consumer`` reads."""
    numbers = {nr for fn, nr in getattr(consumer.grad_fn, "next_functions", None) or () if fn is split_fn}
    return numbers.pop() if len(numbers) == 1 else None


def _order_split_outputs() -> None:
    """Make Torch-Pruning map a ``torch.split``'s parts to the layers that really read them.

    Torch-Pruning gives the i-th consumer it met while tracing the i-th part's channel offsets, but it
    meets consumers in traversal order, not part order: in timm's ``MixedConv2d`` removing channels
    of the first part narrowed the convolution of the second. The consumers are put in part order
    (the autograd output number each one reads) before the mapping is made; when a consumer reads
    several parts, or one cannot be told, the order is left as it was. Its split pruner also leaves
    the part offsets of the first trace in place after a pruning, so a second group pruned through
    the same split was mapped with the old offsets; they are recomputed from the current sizes.
    """
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_split_index_mapping
    if getattr(original, "_prunecp", False):
        return

    def ordered(graph, node):
        sizes = getattr(node.module, "split_sizes", None)
        if isinstance(sizes, list) and all(isinstance(size, int) for size in sizes):
            # its split pruner updates the sizes but leaves the offsets the mapping reads stale
            node.module.offsets = [0, *itertools.accumulate(sizes)]
        numbers = [_split_output_number(node.grad_fn, out) for out in node.outputs]
        if None not in numbers and len(set(numbers)) == len(numbers):
            node.outputs[:] = [out for _, out in sorted(zip(numbers, node.outputs, strict=True), key=lambda pair: pair[0])]
        return original(graph, node)

    ordered._prunecp = True
    index_mapping.update_split_index_mapping = ordered
