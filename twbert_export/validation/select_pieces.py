"""The `select` graph run in pieces, its video blocks computed once per distinct input.

After each selector, the video blocks depend on the text only through the frames it chose, and
in a validation set (every text against every clip) most texts choose the same frames of a clip:
on the demo, 60 texts choose 1.35 distinct first selections per clip on average (at most 4).
Run as one graph, `select` recomputes those blocks for every pair; they are most of its work
(146 of its 258 nodes on the tiny preset). So validation runs the file in pieces cut from its own
nodes, no re-export and nothing recomputed differently:

    stage 0   stem, text_cls -> what the first run of blocks takes (selector 1's frames), ...
    run 1     the blocks after selector 1: one input, memoized by that input's content
    stage 1   selector 2, ...
    run 2     the blocks after selector 2, memoized alike
    stage 2   pooling, ITC

(On the tiny preset no block follows selector 2: its pieces are stage 0, blocks 2-3, stage 1.)

A run is the video blocks (nodes named `/model/video/blocks/<i>/...`, see `split.py`) that follow
one another with no other node between, plus the nodes they enclose (casts, Q/DQ pairs) and the
constants they read; each other node goes to the latest stage its readers allow (so only what a
run needs first crosses a stage boundary). Each piece is an ONNX Runtime session of its own, so
validation checks the pieces against the whole file on the paired rows
(`split.ComposedSplit.check_pieces`) before it uses them; a TensorRT engine is built from the
whole file, as it ships.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..util import require


def content_key(row: np.ndarray) -> bytes:
    """A row's identity by content (memo keys of the split graphs' caches and of the pieces)."""
    return hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=16).digest()

BLOCK_NODE = re.compile(r"/model/video/blocks/(\d+)/")
MEMO_BYTES = 256 * 2**20  # memoized block outputs kept at once (rows of the most recent inputs)


@dataclass
class Piece:
    """One piece of the cut graph: a stage (run on every row) or a run of blocks (`memoized`:
    run once per distinct row of its single input)."""
    name: str
    model: Any  # onnx.ModelProto
    inputs: list[str]
    outputs: list[str]
    memoized: bool


class NoCut(ValueError):
    """The graph does not cut into stages and memoizable block runs (then it runs whole)."""


def cut(model: Any) -> list[Piece]:
    """The pieces of a `select` graph in the order they run. Raises NoCut when the graph has no
    block run, or a run that takes more than one varying input."""
    onnx = require("onnx", "to cut the select graph")
    graph = onnx.shape_inference.infer_shapes(model).graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in graph.node for a in n.attribute):
        raise NoCut("the graph has control flow")
    nodes = list(graph.node)
    producer = {t: i for i, n in enumerate(nodes) for t in n.output if t}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            if t:
                consumers.setdefault(t, []).append(i)
    graph_outputs = {o.name for o in graph.output}
    constant = {i.name for i in graph.initializer}
    for n in nodes:  # topological order: a node of constants only is a constant
        if all(t in constant for t in n.input if t):
            constant.update(t for t in n.output if t)
    varying = [i for i, n in enumerate(nodes) if not all(t in constant for t in n.output if t)]

    runs = _block_runs(nodes, producer, consumers, constant)
    if not runs:
        raise NoCut("no video blocks in the graph")
    run_of = {i: r for r, members in enumerate(runs) for i in members}
    run_inputs = []
    for r, members in enumerate(runs):
        taken = {t for i in members for t in nodes[i].input
                 if t and t not in constant and producer.get(t) not in members}
        if len(taken) != 1:
            raise NoCut(f"blocks run {r + 1} takes {len(taken)} varying inputs")
        run_inputs.append(taken.pop())

    # Stage of each other node: after the last run whose output it needs (0: before run 1).
    ready: dict[str, int] = {}
    stage_of: dict[int, int] = {}
    for i in varying:
        if i in run_of:
            ready.update((t, run_of[i] + 1) for t in nodes[i].output)
            continue
        stage_of[i] = max((ready.get(t, 0) for t in nodes[i].input if t), default=0)
        ready.update((t, stage_of[i]) for t in nodes[i].output)
    for r, t in enumerate(run_inputs):
        if ready.get(t, 0) > r:
            raise NoCut(f"blocks run {r + 1} takes a tensor made after it")
    # Then as late as its readers allow: a tensor crosses from one stage to the next only where
    # a run needs it first (the text's ITC projection, say, stays with the ITC). Why: a stage
    # output is materialized in its graph type, FP16 included, where ONNX Runtime inside one
    # session may keep FP32 (see _with_edge_plumbing); measured 0.0025 on FP16 itc_sim otherwise.
    for i in reversed(varying):
        if i in run_of:
            continue
        readers = [c for t in nodes[i].output for c in consumers.get(t, [])]
        latest = min([run_of[c] if c in run_of else stage_of[c] for c in readers]
                     + ([len(runs)] if set(nodes[i].output) & graph_outputs or not readers
                        else []))
        if latest < stage_of[i]:
            raise NoCut(f"node {nodes[i].name} is needed before it can run")
        stage_of[i] = latest

    members_in_order: list[tuple[str, list[int], bool]] = []
    for r in range(len(runs) + 1):
        stage = [i for i in varying if stage_of.get(i) == r]
        if stage:
            members_in_order.append((f"stage {r}", stage, False))
        if r < len(runs):
            blocks = sorted({int(m.group(1)) for i in runs[r]
                             if (m := BLOCK_NODE.match(nodes[i].name))})
            members_in_order.append((f"blocks {blocks[0]}-{blocks[-1]}", runs[r], True))

    types = {v.name: v for v in (*graph.input, *graph.output, *graph.value_info)}
    pieces = []
    for index, (name, members, memoized) in enumerate(members_in_order):
        inside = {t for i in members for t in nodes[i].output if t and t not in constant}
        later = {i for _, m, _ in members_in_order[index + 1:] for i in m}
        inputs = sorted({t for i in members for t in nodes[i].input
                         if t and t not in constant and t not in inside})
        outputs = sorted(t for t in inside
                         if t in graph_outputs or any(c in later for c in consumers.get(t, [])))
        pieces.append(Piece(name, _submodel(onnx, model, graph, nodes, members, inputs, outputs,
                                            constant, producer, types, name),
                            inputs, outputs, memoized))
    return pieces


def _block_runs(nodes: list, producer: dict[str, int], consumers: dict[str, list[int]],
                constant: set[str]) -> list[list[int]]:
    """Node numbers of each run of consecutive video blocks, the enclosed nodes included."""
    block_of = {i: int(m.group(1)) for i, n in enumerate(nodes)
                if (m := BLOCK_NODE.match(n.name))}

    def enclosed(before: set[int], after: set[int]) -> set[int]:
        """Nodes of no block whose varying inputs come from `before` (or from each other) and
        whose outputs `after` reads: a cast or a Q/DQ pair between two blocks."""
        def readers(i: int) -> set[int]:
            return {c for t in nodes[i].output for c in consumers.get(t, [])}

        forward: set[int] = set()  # what `before` alone computes, outside every block
        frontier = {c for i in before for c in readers(i)}
        while frontier:
            i = frontier.pop()
            if i in before or i in after or i in forward or i in block_of:
                continue
            if {producer.get(t) for t in nodes[i].input if t and t not in constant} <= (
                    before | forward):
                forward.add(i)
                frontier |= readers(i)
        found: set[int] = set()  # of that, what `after` reads
        stack = [producer[t] for i in after for t in nodes[i].input if producer.get(t) in forward]
        while stack:
            i = stack.pop()
            if i in forward and i not in found:
                found.add(i)
                stack.extend(producer[t] for t in nodes[i].input if t in producer)
        return found

    runs: list[set[int]] = []
    for b in sorted(set(block_of.values())):
        members = {i for i, v in block_of.items() if v == b}
        members |= enclosed(members, members)  # its own casts and Q/DQ pairs
        feeds_from = {producer.get(t) for i in members for t in nodes[i].input
                      if t and t not in constant} - members - {None}
        between = enclosed(runs[-1], members) if runs else set()
        if runs and feeds_from and feeds_from <= runs[-1] | between:
            runs[-1] |= members | between
        else:
            runs.append(members)
    return [sorted(_with_edge_plumbing(nodes, r, consumers, producer, constant)) for r in runs]


PLUMBING_OPS = {"Cast", "QuantizeLinear", "DequantizeLinear"}


def _with_edge_plumbing(nodes: list, run: set[int], consumers: dict[str, list[int]],
                        producer: dict[str, int], constant: set[str]) -> set[int]:
    """The run with the casts and Q/DQ nodes at its edges (into its first block, out of its
    last): a piece's input and output are then the tensors the graph has on either side of
    them. Why: ONNX Runtime on the CPU computes FP16 nodes in FP32 and drops a Cast pair
    (FP32 -> FP16 -> FP32) inside one session, so a piece boundary on the FP16 side would round
    where the whole graph does not (measured: 0.017 on itc_sim)."""
    run = set(run)
    changed = True
    while changed:
        changed = False
        for i, n in enumerate(nodes):
            if i in run or n.op_type not in PLUMBING_OPS:
                continue
            readers = {c for t in n.output for c in consumers.get(t, [])}
            sources = {producer.get(t) for t in n.input if t and t not in constant}
            into = bool(readers) and readers <= run
            out_of = bool(sources) and sources <= run and all(
                nodes[c].op_type in PLUMBING_OPS or c in run
                for t in n.input if t and t not in constant for c in consumers.get(t, []))
            if into or out_of:
                run.add(i)
                changed = True
    return run


def _submodel(onnx: Any, model: Any, graph: Any, nodes: list, members: list[int],
              inputs: list[str], outputs: list[str], constant: set[str],
              producer: dict[str, int], types: dict[str, Any], name: str) -> Any:
    """A model of `members` (in graph order) and the constant nodes and initializers they read."""
    wanted = set(members)
    stack = [t for i in members for t in nodes[i].input if t in constant]
    while stack:  # constant-only producers of what the members read
        t = stack.pop()
        i = producer.get(t)
        if i is not None and i not in wanted:
            wanted.add(i)
            stack.extend(t for t in nodes[i].input if t)
    kept = [nodes[i] for i in sorted(wanted)]
    read = {t for n in kept for t in n.input if t}
    initializers = [init for init in graph.initializer if init.name in read]
    missing = [t for t in (*inputs, *outputs) if t not in types]
    if missing:
        raise NoCut(f"no type for {missing[0]} (shape inference)")
    sub = onnx.helper.make_graph(kept, f"select {name}", [types[t] for t in inputs],
                                 [types[t] for t in outputs], initializers)
    return onnx.helper.make_model(sub, opset_imports=model.opset_import,
                                  ir_version=model.ir_version)


class PiecewiseSelect:
    """`select` over any rows through its pieces on ONNX Runtime, each block run once per
    distinct row of its input while that row is among the recent ones (`MEMO_BYTES`).
    `executions` / `rows` count the session runs and rows per piece."""

    def __init__(self, path: str | Path, threads: int | None = None):
        onnx = require("onnx", "to cut the select graph")
        ort = require("onnxruntime", "to run the select graph's pieces")
        model = onnx.load(str(path))
        self.pieces = cut(model)
        self.output_names = [o.name for o in model.graph.output]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.sessions = [ort.InferenceSession(p.model.SerializeToString(), sess_options=opts,
                                              providers=["CPUExecutionProvider"])
                         for p in self.pieces]
        self.memos: list[OrderedDict[bytes, list[np.ndarray]]] = [OrderedDict()
                                                                  for _ in self.pieces]
        self.executions: dict[str, int] = {p.name: 0 for p in self.pieces}
        self.rows: dict[str, int] = {p.name: 0 for p in self.pieces}

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The whole graph's outputs (in its order) for one batch of rows."""
        values = dict(feed)
        n = len(next(iter(feed.values())))
        for k, (piece, session) in enumerate(zip(self.pieces, self.sessions)):
            if piece.memoized:
                outs = self._memoized(k, values[piece.inputs[0]], n)
            else:
                outs = session.run(piece.outputs, {t: values[t] for t in piece.inputs})
                self.executions[piece.name] += 1
                self.rows[piece.name] += n
            values.update(zip(piece.outputs, outs))
        return [values[name] for name in self.output_names]

    def _memoized(self, k: int, x: np.ndarray, n: int) -> list[np.ndarray]:
        piece, memo = self.pieces[k], self.memos[k]
        if len(x) != n:
            raise RuntimeError(f"{piece.name}: input of {len(x)} rows for {n} rows")
        keys = [content_key(row) for row in x]
        distinct = list(dict.fromkeys(keys))
        for key in distinct:
            if key in memo:
                memo.move_to_end(key)  # this batch's rows are the most recent
        missing = [key for key in distinct if key not in memo]
        if missing:
            first = {key: i for i, key in reversed(list(enumerate(keys)))}
            rows = [first[key] for key in missing]
            outs = self.sessions[k].run(piece.outputs, {piece.inputs[0]: x[rows]})
            if any(len(o) != len(rows) for o in outs):
                raise RuntimeError(f"{piece.name}: outputs are not one row per input row")
            self.executions[piece.name] += 1
            self.rows[piece.name] += len(rows)
            for j, key in enumerate(missing):
                memo[key] = [o[j] for o in outs]
            row_bytes = sum(o[0].nbytes for o in outs)
            while len(memo) > max(len(distinct), MEMO_BYTES // max(row_bytes, 1)):
                memo.popitem(last=False)  # never one of this batch's: they are at the end
        return [np.stack([memo[key][j] for key in keys]) for j in range(len(piece.outputs))]
