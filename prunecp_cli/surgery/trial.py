"""Prune a model in place for a measurement or a check, then put it back exactly as it was.

Used to meet FLOPs targets on trial prunings (:mod:`prunecp_cli.pipeline.flops_target`) and to find
the groups whose removal breaks a model (:func:`prunecp_cli.surgery.plan.apply_removal`), both without
copying the model or re-tracing its dependency graph.
"""

from __future__ import annotations

from prunecp_cli.surgery.groups import ModelGraph


class Trial:
    """Prune a model in place for a measurement, then restore every module exactly.

    Torch-Pruning replaces a pruned layer's parameters, buffers and width attributes rather than
    editing tensors in place, so a shallow copy of each module's state is enough to undo a removal.
    Its graph's own operation nodes (concatenations, splits, slices) keep their sizes in lists it
    edits in place, so those are copied list by list, and so is the graph's pruning history. The
    module objects stay the same, so the graph stays valid.
    """

    def __init__(self, graph: ModelGraph) -> None:
        self.graph = graph
        self.modules = dict(graph.model.named_modules())
        self._saved = {name: (dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
                       for name, m in self.modules.items()}
        own = {id(m) for m in self.modules.values()}
        self._ops = [(op, self._copy(op.__dict__)) for op in graph.dg.module2node if id(op) not in own]
        self._history = list(graph.dg._pruning_history)

    @staticmethod
    def _copy(state: dict) -> dict:
        return {key: list(value) if isinstance(value, list) else value for key, value in state.items()}

    def restore(self) -> None:
        for name, module in self.modules.items():
            state, params, buffers, children = self._saved[name]
            module.__dict__.clear()
            module.__dict__.update(state)
            module._parameters, module._buffers, module._modules = dict(params), dict(buffers), dict(children)
        for op, state in self._ops:
            op.__dict__.clear()
            op.__dict__.update(self._copy(state))
        self.graph.dg._pruning_history = list(self._history)
