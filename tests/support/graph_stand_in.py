"""A stand-in for CUDA graphs on the CPU, for the tests of the graph-capture logic.

`StandInGraphs` is the GraphCache of sdengine/backends/cuda_graphs.py with capture() replaced:
it runs the two warm-ups as the real one does, counts the capture, and returns a "graph"
whose replay() runs the function again. So on the CPU the tests exercise everything that
capture and replay rely on: warm-ups that advance the state are undone, one entry's static
buffers serve every step of every run, outputs are copied out of the entry's buffers, the
cache stays bounded, and two runs never share an instance.
"""

import types

from sdengine.backends.cuda_graphs import GraphCache


class StandInGraphs(GraphCache):
    def __init__(self, capacity: int = 8, fail=()):
        super().__init__(capacity)
        self.replays = 0
        self.fail = fail  # what-prefixes ("unet", "the whole euler step") whose capture raises
        self._what = ""

    def try_capture(self, run, what):
        self._what = what
        return super().try_capture(run, what)

    def capture(self, run):
        if self._what.startswith(tuple(self.fail)):
            raise RuntimeError("operation not permitted when stream is capturing")  # as a syncing op would
        for _ in range(2):
            run()
        self.captures += 1
        out = run()  # what the capture itself records (its outputs become the static buffers)

        def replay():
            self.replays += 1
            result = run()
            _copy_into(out, result)

        return types.SimpleNamespace(replay=replay), out


def _copy_into(static, result):
    """A replay writes into the captured outputs' memory, as a CUDA graph does."""
    if isinstance(static, tuple):
        for s, r in zip(static, result):
            _copy_into(s, r)
    elif static is not None and static is not result:
        static.copy_(result)


def use_stand_in(backend, capacity: int = 8, **kwargs) -> StandInGraphs:
    """Give a graph-layer backend (graph, triton, compile) stand-in graphs, as on CUDA."""
    graphs = StandInGraphs(capacity, **kwargs)
    backend.graphs = graphs
    backend._graphed = {}
    return graphs
