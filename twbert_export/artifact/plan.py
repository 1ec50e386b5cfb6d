"""A precision per split graph (issue 21): `--precision text=fp16,video_stem=int8,select=fp16,fuse=fp16`.

A plan gives each split graph (`SPLIT_GRAPHS`) one precision of `PRECISIONS`; the whole-model
file keeps one precision, by default the plan's most accurate one (the first of its precisions
in `PRECISIONS` order), or the one named by `model=P` in the plan. A plan's name is its most
common precision (ties: the earlier in `PRECISIONS`) followed by `+graph-precision` for each
graph that differs, in `SPLIT_GRAPHS` order: `fp16+video_stem-int8`. So a plan that gives every
graph the same precision is named by that precision, and the split graphs of a plain precision
are the plan of that name. A plan is judged with the gates of its least accurate precision (the
last in `PRECISIONS` order): a composed output is no closer to PyTorch than its loosest graph.

Torch-free: the artifact's readers resolve `--precision PLAN` through it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .manifest import MODEL_GRAPH, PRECISIONS, SPLIT_GRAPHS, Manifest

EXCEPTION_SEPARATOR = "+"  # fp16+video_stem-int8


class PlanError(ValueError):
    """A plan that does not parse: an unknown graph or precision, a graph named twice or left out."""


def is_plan_spec(text: str) -> bool:
    """Whether a --precision value is a per-graph plan (graph=precision,...) rather than a list
    of precisions."""
    return "=" in text


@dataclass(frozen=True)
class Plan:
    graphs: tuple[tuple[str, str], ...]  # (graph, precision) in SPLIT_GRAPHS order
    model: str  # the whole-model file's precision

    @classmethod
    def of(cls, graphs: dict[str, str], model: str | None = None) -> "Plan":
        ordered = tuple((g, graphs[g]) for g in SPLIT_GRAPHS)
        return cls(ordered, model or _ordered(graphs.values())[0])

    @property
    def by_graph(self) -> dict[str, str]:
        return dict(self.graphs)

    @property
    def precisions(self) -> list[str]:
        """Every precision the export converts to for this plan (fp32, the base, first)."""
        return _ordered({"fp32", self.model, *self.by_graph.values()})

    @property
    def gate_precision(self) -> str:
        """The precision whose gates judge the plan composed: its least accurate."""
        return _ordered(self.by_graph.values())[-1]

    @property
    def uniform(self) -> bool:
        return len(set(self.by_graph.values())) == 1

    @property
    def name(self) -> str:
        return plan_name(self.by_graph)

    @property
    def spec(self) -> str:
        return ",".join(f"{g}={p}" for g, p in self.graphs)

    def needs(self, graph: str, precision: str) -> bool:
        """Whether the export converts `graph` to `precision` (fp32 is always written)."""
        if precision == "fp32":
            return True
        return precision == (self.model if graph == MODEL_GRAPH else self.by_graph.get(graph))


def _ordered(precisions) -> list[str]:
    return [p for p in PRECISIONS if p in set(precisions)]


def plan_name(graphs: dict[str, str]) -> str:
    """graph -> precision to the plan's name: `fp16`, `fp16+video_stem-int8`."""
    counts = Counter(graphs.values())
    base = max(_ordered(counts), key=lambda p: counts[p])  # max keeps the first of a tie
    return base + "".join(f"{EXCEPTION_SEPARATOR}{g}-{graphs[g]}" for g in SPLIT_GRAPHS
                          if g in graphs and graphs[g] != base)


def parse_plan(text: str) -> Plan:
    """'video_stem=int8,text=fp16,select=fp16,fuse=fp16[,model=fp16]' -> Plan; PlanError names
    the first thing wrong."""
    graphs: dict[str, str] = {}
    model = None
    for item in (i.strip() for i in text.split(",")):
        graph, sep, precision = (part.strip() for part in item.partition("="))
        if not sep:
            raise PlanError(f"plan item {item!r} is not GRAPH=PRECISION (a plan names every "
                            f"split graph: {','.join(g + '=fp16' for g in SPLIT_GRAPHS)})")
        if graph not in (*SPLIT_GRAPHS, MODEL_GRAPH):
            raise PlanError(f"unknown graph {graph!r} in the plan; the split graphs are "
                            f"{', '.join(SPLIT_GRAPHS)} (and {MODEL_GRAPH} for the whole-model "
                            "file)")
        if precision not in PRECISIONS:
            raise PlanError(f"unknown precision {precision!r} for {graph} in the plan; choose "
                            f"from {', '.join(PRECISIONS)}")
        if graph in graphs or (graph == MODEL_GRAPH and model is not None):
            raise PlanError(f"graph {graph!r} is named twice in the plan")
        if graph == MODEL_GRAPH:
            model = precision
        else:
            graphs[graph] = precision
    missing = [g for g in SPLIT_GRAPHS if g not in graphs]
    if missing:
        raise PlanError(f"the plan gives no precision to {', '.join(missing)}; a plan names "
                        f"every split graph ({', '.join(SPLIT_GRAPHS)})")
    return Plan.of(graphs, model)


# -- an artifact's plans --------------------------------------------------------------------------
def split_plans(manifest: Manifest) -> dict[str, dict[str, str]]:
    """name -> graph -> precision of every set of split graphs the artifact can run: the plans
    it was exported with first, then each precision whose four split graphs it holds."""
    plans = {name: dict(entry.graphs) for name, entry in manifest.plans.items()}
    for p in reversed(manifest.precisions):  # the last precision first, as before plans
        if p not in plans and all(manifest.file(p, g) for g in SPLIT_GRAPHS):
            plans[p] = {g: p for g in SPLIT_GRAPHS}
    return plans


def resolve_plan(manifest: Manifest, precision: str | None) -> tuple[str, dict[str, str]]:
    """A consumer's --precision (a precision, a plan's name or its GRAPH=PRECISION list; None:
    the artifact's default, its exported plan or else its last precision) -> (plan name, graph ->
    precision). PlanError when the artifact has no such split graphs."""
    plans = split_plans(manifest)
    if not plans:
        raise PlanError("the artifact holds no split graphs (exported with --graphs monolithic):"
                        " export again with --graphs both")
    if precision is None:
        name = next(iter(plans))
    else:
        name = parse_plan(precision).name if is_plan_spec(precision) else precision
    if name not in plans:
        raise PlanError(f"--precision {precision}: the artifact has no such split graphs (it has "
                        f"{', '.join(plans)})")
    return name, plans[name]


def model_precision(manifest: Manifest, precision: str | None) -> str | None:
    """The whole-model file's precision for a consumer's --precision: a precision as it is, a
    plan (name or GRAPH=PRECISION list) the one its export gave the whole model; None stays
    None (the consumer's default)."""
    if precision is None:
        return None
    if precision in manifest.plans:  # an exported plan first: a uniform one is named by its
        return manifest.plans[precision].model  # precision, but `model=P` may give another
    if precision in PRECISIONS:
        return precision
    name, _ = resolve_plan(manifest, precision)
    entry = manifest.plans.get(name)
    return entry.model if entry else name
