"""Serve an artifact on Triton Inference Server, with the models bound in-process through NVIDIA's
PyTriton (`nvidia-pytriton`: a real `tritonserver` with its Python backend; KServe v2 HTTP/gRPC,
dynamic batching, model instances, health, metrics and statistics endpoints).

    python export.py serve --artifact engines/NAME [--index INDEX] [--http-port 8000]
                           [--grpc-port 8001] [--instances N] [--max-batch B]
                           [--max-queue-delay-us U]

Models (each request is one row; Triton's dynamic batcher joins concurrent rows into batches
within the exported batch range, which the runner takes in one call):
- `twbert_score`: `video` FP32 (T, 3, S, S) + `text` BYTES (1,) -> `match_probability` FP64 (1,),
  `itc_similarity` FP32 (1,), `itm_logits` FP32 (2,) and, with frame selection, `frames` INT64
  (K2,): the numbers `predict --text` ranks by, computed as it computes them.
- `twbert_qa` (QA artifacts): `video` + `question` BYTES (1,) -> `answer` BYTES (1,),
  `probability` FP64 (1,), `answer_index` INT64 (1,): what `predict --question` prints.
- `twbert_retrieve` (with `--index INDEX`, a clip index `export.py index` made with this
  artifact): `text` BYTES (1,), optional `k` INT64 (1,) (ITC shortlist re-ranked by ITM, default
  50), `top` INT64 (1,) (the N best; default 0: every clip ranked) and `shortlist` INT64 (1,)
  (the cascade's M: the clips its FAISS first stage passes on, default
  `clip_index.DEFAULT_SHORTLIST`; 0: every clip ranked exactly) -> `clips` BYTES (N,),
  `match_probability` FP64 (N,) (-1 outside the shortlist), `shortlisted` BOOL (N,) (which clips
  have a match probability), `itc_similarity` FP32 (N,), `first_stage_similarity` FP32 (N,)
  (the first stage's inner product; -2 where the ranking was exact), `index_rows` INT64 (N,)
  (each clip's row in the index: ties go to the lower) and, with
  frame selection, `frames` INT64 (N, K2): the ranking `predict --index --text` prints, made by
  the same code (`gallery.ranked_clips` on the split graphs of the index's precision). Rows of a
  request must ask for the same `top`. Batches the dynamic batcher forms are ranked one text
  after the other (one ranking reads every stem once: batching texts would save no graph run
  worth having on a small index, and keeps the code `predict --index` runs).
- `twbert_shard` (with `--index SHARD`, a shard `export.py index-split` wrote): no input ->
  `identity` BYTES (1,), the shard's manifest as JSON; `export.py query --shards` checks every
  shard's before it queries any (`retrieval/shards.py`, `serving/fanout.py`).
Clients send decoded clips (`preprocess.load_video`, as predict does) and raw text; the server
tokenises with the artifact's tokenizer. Triton itself refuses a wrong shape or dtype; the model
refuses, with HTTP 400 / gRPC INVALID_ARGUMENT and a one-line reason, an empty, non-UTF-8 or too
long text, clips the preprocessing cannot have made (NaN, Inf, out of range) and bad `k` / `top`
(docs/serving.md); either way the server stays up. The other requests the batcher
joined to a refused one in that batch are not run: they get UNAVAILABLE (HTTP 503), send again.
`/v2/health/ready` answers 200 only once every model is loaded.

The runner is the artifact's, chosen from the model file as `predict` chooses it (ONNX Runtime
for .onnx, TensorRT for an .engine after the engine preflight), one per model instance.
Ports are bound on 127.0.0.1 only: put a reverse proxy or the stock Triton container
(`export.py triton-repo`) in front for other hosts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..artifact.manifest import PRECISIONS, Manifest
from ..artifact.plan import model_precision
from ..util import require
from ..validation.artifact_runner import Artifact
from ..validation.runners import batched, run_batches
from ..retrieval.shards import shard_of
from .served import (DEFAULT_K, QA_MODEL, QA_TEXT, RETRIEVE_MODEL, RETRIEVE_OPTIONAL,
                     SCORE_MODEL, SCORE_TEXT, SHARD_MODEL, BadRequest, answer_outputs,
                     check_shortlists, check_text_lengths, check_video, ranking_width,
                     retrieval_io, retrieval_outputs, row_ints, score_outputs, texts_of)

LOOPBACK = "127.0.0.1"
# The dynamic batcher's default wait, chosen from the sweep in docs/serving.md.
DEFAULT_QUEUE_DELAY_US = 5000
# PyTriton protects these endpoints with a generated token by default; the statistics endpoint
# is left open (read-only, loopback only) so that clients and the load test can read the batch
# sizes the dynamic batcher formed.
PROTECTED_ENDPOINTS = ["shared-memory", "model-repository", "trace", "logging"]


@dataclass(frozen=True)
class ServeOptions:
    artifact: str
    precision: str | None = None
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instances: int = 1
    max_batch: int | None = None  # default: the exported batch max
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    threads: int | None = None  # ONNX Runtime intra-op threads per instance
    index: str | None = None  # a clip index: serve `twbert_retrieve` over it


def model_file(artifact: str | Path, precision: str | None = None) -> Path:
    """The model to serve: a file (.onnx or .engine) as given, or for an artifact directory the
    manifest's file of `precision` (default fp16 if there, else fp32), its .engine when one was
    built beside it (TensorRT), else the .onnx (ONNX Runtime)."""
    path = Path(artifact)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"--artifact {path}: no such directory or model file")
    manifest = Manifest.load(path)
    chosen = model_precision(manifest, precision) or (
        "fp16" if "fp16" in manifest.precisions else manifest.precisions[0])
    entry = manifest.file(chosen)
    if entry is None:
        raise ValueError(f"--precision {chosen}: {path} holds {', '.join(manifest.precisions)}")
    onnx = path / entry.path
    engine = onnx.with_suffix(".engine")
    return engine if engine.is_file() else onnx


class ArtifactModel:
    """One model instance: the artifact's runner (activated) and the computations the served
    models make, the same as `predict` makes them."""

    def __init__(self, artifact: Artifact, runner: Any):
        self.artifact, self.runner = artifact, runner
        self.contract = artifact.contract

    def check(self, request: Any, text_input: str) -> None:
        """BadRequest unless one request's rows can be run: texts that fit the model, clips the
        preprocessing can have made."""
        texts = texts_of(np.asarray(request[text_input]), text_input)
        check_text_lengths(self.artifact.tokenizer, texts, self.contract.text_len, text_input)
        check_video(np.asarray(request["video"]))

    def forward(self, video: np.ndarray, texts: list[str]) -> dict[str, np.ndarray]:
        """The contract's outputs for rows of (clip, text); batches outside the exported range
        are split (above max) or padded by repeating the last row (below min)."""
        ids, mask, _ = self.artifact.tokenizer.encode(texts, self.contract.text_len)
        n, low = len(video), self.contract.batch.min
        feed = {"video": np.ascontiguousarray(video, np.float32), "input_ids": ids,
                "attention_mask": mask}
        if n < low:
            feed = {k: np.concatenate([v, np.repeat(v[-1:], low - n, 0)]) for k, v in feed.items()}
        out = run_batches(self.runner, batched(feed, self.contract.batch.max))
        return {k: v[:n] for k, v in out.items()}

    def score(self, video: np.ndarray, text: np.ndarray) -> dict[str, np.ndarray]:
        return score_outputs(self.forward(video, texts_of(text, SCORE_TEXT)))

    def answer(self, video: np.ndarray, question: np.ndarray) -> dict[str, np.ndarray]:
        return answer_outputs(self.forward(video, texts_of(question, QA_TEXT)),
                              self.artifact.answers or [])


@dataclass(frozen=True)
class ModelSpec:
    """A served model: its name, tensors (shapes without the batch axis) and computation."""
    name: str
    inputs: list[tuple[str, Any, tuple[int, ...]]]
    outputs: list[tuple[str, Any, tuple[int, ...]]]
    compute: Callable[[Any], Callable[..., Any]]  # instance -> infer function
    batched: bool = True  # False: no batch axis, no dynamic batcher (twbert_shard)


def model_specs(artifact: Artifact) -> list[ModelSpec]:
    c = artifact.contract
    video = ("video", np.float32, (c.frames, 3, c.image_size, c.image_size))
    score_out = [("match_probability", np.float64, (1,)), ("itc_similarity", np.float32, (1,)),
                 ("itm_logits", np.float32, (2,))]
    kept = next((t for t in c.outputs if t.name == "frame_indices_2"), None)
    if kept is not None:
        score_out.append(("frames", np.int64, (int(kept.shape[1]),)))
    specs = [ModelSpec(SCORE_MODEL, [video, (SCORE_TEXT, bytes, (1,))], score_out,
                       lambda m: m.score)]
    if c.task == "qa" and artifact.answers:
        specs.append(ModelSpec(QA_MODEL, [video, (QA_TEXT, bytes, (1,))],
                               [("answer", bytes, (1,)), ("probability", np.float64, (1,)),
                                ("answer_index", np.int64, (1,))], lambda m: m.answer))
    return specs


OPTIONAL = (*RETRIEVE_OPTIONAL, "probe")  # inputs a request may leave out


def row_values(request: Any, name: str, rows: int, default: int) -> list[int]:
    """An optional INT64 (N, 1) input of a PyTriton request as N ints (`served.row_ints`)."""
    return row_ints(request[name] if name in request else None, rows, default)


class RetrievalModel:
    """One instance of `twbert_retrieve`: the index and the split graphs that made it; each text
    ranks every indexed clip as `predict --index` ranks them (`gallery.ranked_clips`)."""

    def __init__(self, split: Any, index: Any, pipeline: Any):
        self.split, self.index, self.pipeline = split, index, pipeline
        self.rows = {clip_id: row for row, clip_id in enumerate(index.clip_ids)}

    def retrieve(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        """PyTriton's undecorated form: the requests of one batch, each answered on its own
        (their rankings may differ in length with `top`). When a request is refused
        (BadRequest), RefusedRequests carries each one's reason, as `refusing` does."""
        answers, reasons = [], []
        for request in requests:
            try:
                answers.append(self.ranking(request))
                reasons.append(None)
            except BadRequest as e:
                reasons.append(str(e))
        if any(reasons):
            from .pytriton_compat import RefusedRequests

            raise RefusedRequests(reasons)
        return answers

    def ranking(self, request: Any) -> dict[str, np.ndarray]:
        from ..retrieval.clip_index import DEFAULT_SHORTLIST
        from ..retrieval.gallery import ranked_clips

        texts = texts_of(request[SCORE_TEXT], SCORE_TEXT)
        check_text_lengths(self.split.tokenizer(), texts, self.split.manifest.contract.text_len,
                           SCORE_TEXT)
        ks = row_values(request, "k", len(texts), DEFAULT_K)
        width = ranking_width(ks, row_values(request, "top", len(texts), 0), len(self.index))
        shortlists = row_values(request, "shortlist", len(texts), DEFAULT_SHORTLIST)
        check_shortlists(ks, shortlists)
        rankings = [ranked_clips(self.split, self.index, self.pipeline, text, k, m)[:width]
                    for text, k, m in zip(texts, ks, shortlists)]
        rows = [[self.rows[c.clip_id] for c in ranking] for ranking in rankings]
        return retrieval_outputs(rankings, width, selected_frames(self.split), rows)


def selected_frames(split: Any) -> int | None:
    """Frames the second selector keeps (K2), None for an artifact without frame selection."""
    kept = next((t for t in split.contracts["select"].outputs if t.name == "frame_indices_2"),
                None)
    return None if kept is None else int(kept.shape[1])


def retrieval_spec(split: Any) -> ModelSpec:
    def bound(tensors: list) -> list:
        return [(name, bytes if dtype == "bytes" else np.dtype(dtype).type, shape)
                for name, dtype, shape in tensors]

    inputs, outputs = retrieval_io(selected_frames(split))
    return ModelSpec(RETRIEVE_MODEL, bound(inputs), bound(outputs), lambda m: m.retrieve)


def shard_spec(identity: Any) -> ModelSpec:
    """`twbert_shard`, served with a shard of a split index (`retrieval.shards`): a request
    with no input gets `identity` BYTES (1,), the shard's manifest as JSON, which a fan-out
    checks for every shard before it sends any of them a query (`serving.fanout`)."""
    answer = {"identity": np.array([identity.to_json().encode("utf-8")], dtype=np.object_)}
    return ModelSpec(SHARD_MODEL, [("probe", np.int64, (1,))], [("identity", bytes, (1,))],
                     lambda _: lambda requests: [answer for _ in requests], batched=False)


def index_split(artifact: str, index: str, precision: str | None = None) -> tuple[Any, Any]:
    """The split graphs that made the index (of `precision` when it names a per-graph plan;
    their .engine files when all were built beside the .onnx, as `model_file` prefers an
    engine) and the index, opened for them."""
    from ..retrieval.clip_index import ClipIndex
    from ..retrieval.gallery import SplitArtifact

    if not Path(artifact).is_dir():
        raise ValueError(f"--index needs --artifact to be the artifact directory, got {artifact}")
    plan = None if precision is None or precision in PRECISIONS else precision
    split = SplitArtifact.for_index(artifact, index, precision=plan)
    if all(f.with_suffix(".engine").is_file() for f in split.files.values()):
        split = SplitArtifact(artifact, split.precision, engines=True)
    opened = ClipIndex.open(index, split.identity, split.stem_shape)
    opened.load_first_stage()  # kept in memory for the server's life (clip_index)
    return split, opened


def check_ports_distinct(ports: dict[str, int]) -> None:
    """ValueError naming two options given the same port: Triton would print its usage and
    exit, and PyTriton only notice after its start-up timeout. Checked before anything loads."""
    seen: dict[int, str] = {}
    for option, port in ports.items():
        if port in seen:
            raise ValueError(f"{seen[port]} and {option} are both {port}: each endpoint needs a "
                             f"port of its own (e.g. --http-port 8000 --grpc-port 8001 "
                             "--metrics-port 8002)")
        seen[port] = option


def check_ports_free(ports: dict[str, int]) -> None:
    """ValueError naming the first port already taken on the loopback address: Triton would
    exit on it, and PyTriton only notice after its start-up timeout."""
    for option, port in ports.items():
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError as e:
                raise ValueError(f"{option} {port}: cannot listen on {LOOPBACK}:{port} "
                                 f"({e.strerror}): choose another port") from None


def use_own_libpython() -> None:
    """Make Triton's Python-backend stub load this interpreter's libpython.

    The stub links `libpython3.X.so.1.0` and the dynamic loader finds the system's copy first;
    with a Python of another patch level (e.g. pyenv's 3.11.7 beside Debian's 3.11.2) the stub
    then runs that library against this interpreter's standard library and model loading fails
    ('_thread.RLock' object has no attribute '_recursion_count'). PyTriton starts tritonserver
    with this process's environment (appending its own libraries to LD_LIBRARY_PATH), so putting
    our LIBDIR first is enough. A Python built without a shared library has none to offer: then
    the system's must be of the same patch level (make the environment from /usr/bin/python3)."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and (Path(libdir) / str(sysconfig.get_config_var("INSTSONAME"))).is_file():
        rest = os.environ.get("LD_LIBRARY_PATH")
        os.environ["LD_LIBRARY_PATH"] = libdir + (f":{rest}" if rest else "")


def pytriton():
    """PyTriton's modules, or MissingDependency naming the serving install."""
    require("pytriton", "to serve on Triton Inference Server")
    from pytriton import decorators, model_config, triton

    return decorators, model_config, triton


@contextlib.contextmanager
def started(opts: ServeOptions, log: Callable[[str], None] = print) -> Iterator[Any]:
    """Triton running with the artifact's models bound; yields the pytriton `Triton` object.
    Stops the server and deactivates the runners on the way out."""
    check_ports_distinct({"--http-port": opts.http_port, "--grpc-port": opts.grpc_port,
                          "--metrics-port": opts.metrics_port})
    path = model_file(opts.artifact, opts.precision)
    artifact = Artifact(path)
    c = artifact.contract
    max_batch = opts.max_batch or c.batch.max
    if not 1 <= max_batch <= c.batch.max:
        raise ValueError(f"--max-batch {max_batch} is outside the exported batch range "
                         f"1..{c.batch.max}")
    if opts.instances < 1:
        raise ValueError(f"--instances must be >= 1, got {opts.instances}")
    split, index = (index_split(opts.artifact, opts.index, opts.precision) if opts.index
                    else (None, None))
    shard = shard_of(opts.index) if opts.index else None
    check_ports_free({"--http-port": opts.http_port, "--grpc-port": opts.grpc_port,
                      "--metrics-port": opts.metrics_port})
    decorators, model_config, triton_module = pytriton()
    use_own_libpython()
    log_file = Path(tempfile.gettempdir()) / f"twbert-triton-{os.getpid()}.log"
    config = triton_module.TritonConfig(
        http_address=LOOPBACK, http_port=opts.http_port, grpc_address=LOOPBACK,
        grpc_port=opts.grpc_port, metrics_address=LOOPBACK, metrics_port=opts.metrics_port,
        log_verbose=0, exit_on_error=True, log_file=log_file)
    security = triton_module.TritonSecurityConfig(restricted_endpoints=PROTECTED_ENDPOINTS)
    specs = model_specs(artifact)
    with contextlib.ExitStack() as stack:
        workspace = stack.enter_context(tempfile.TemporaryDirectory(prefix="twbert-triton-"))
        # One runner per instance (activation checks the file: contract, hash, engine preflight).
        models = [ArtifactModel(artifact, stack.enter_context(artifact.runner(opts.threads)))
                  for _ in range(opts.instances)]
        bound = [(spec, [refusing(request_check(m, spec), decorators.batch(spec.compute(m)))
                         for m in models]) for spec in specs]
        if split is not None:
            retrievers = [RetrievalModel(split, index,
                                         stack.enter_context(split.pipeline(opts.threads)))
                          for _ in range(opts.instances)]
            spec = retrieval_spec(split)
            bound.append((spec, [spec.compute(r) for r in retrievers]))
            specs.append(spec)
        if shard is not None:
            specs.append(shard_spec(shard))
            bound.append((specs[-1], [specs[-1].compute(None)]))
        server = stack.enter_context(triton_module.Triton(
            config=config, security_config=security, **loaded_at_start(triton_module,
                                                                       workspace)))
        for spec, infer_funcs in bound:
            server.bind(
                model_name=spec.name,
                infer_func=infer_funcs,
                inputs=[model_config.Tensor(name=n, dtype=d, shape=s, optional=n in OPTIONAL)
                        for n, d, s in spec.inputs],
                outputs=[model_config.Tensor(name=n, dtype=d, shape=s)
                         for n, d, s in spec.outputs],
                config=model_config.ModelConfig(
                    max_batch_size=max_batch,
                    batcher=model_config.DynamicBatcher(
                        max_queue_delay_microseconds=opts.max_queue_delay_us))
                if spec.batched else model_config.ModelConfig(batching=False),
                strict=True)
        refusals = refusals_answered(Path(workspace) / "pytriton")
        runtime = "TensorRT" if path.suffix == ".engine" else "ONNX Runtime"
        log(f"serving {path} ({runtime}, task {c.task}, F@{c.schedule}): "
            f"{', '.join(s.name for s in specs)}; batches up to {max_batch}, queue delay "
            f"{opts.max_queue_delay_us} us, {opts.instances} instance(s)")
        if split is not None:
            split_runtime = "TensorRT" if split.files["text"].suffix == ".engine" \
                else "ONNX Runtime"
            log(f"  {RETRIEVE_MODEL}: {len(index)} clips in {opts.index}, split graphs "
                f"{split.precision} ({split_runtime})"
                + (f"; {SHARD_MODEL}: {shard.label}" if shard is not None else ""))
        log(f"  http://{LOOPBACK}:{opts.http_port}  grpc {LOOPBACK}:{opts.grpc_port}  "
            f"metrics http://{LOOPBACK}:{opts.metrics_port}/metrics  "
            f"Triton's log: {log_file}")
        if not refusals:
            log("  note: this PyTriton answers refused requests with HTTP 500 and a traceback "
                "(400 / INVALID_ARGUMENT needs nvidia-pytriton 0.7.0: twbert_export."
                "pytriton_compat)")
        yield server


def request_check(model: ArtifactModel, spec: ModelSpec) -> Callable[[Any], None]:
    """The check (`ArtifactModel.check`) of one request to a score or QA model."""
    text_input = next(n for n, _, _ in spec.inputs if n in (SCORE_TEXT, QA_TEXT))
    return lambda request: model.check(request, text_input)


def refusing(check: Callable[[Any], None], infer: Callable[[list], list]
             ) -> Callable[[list], list]:
    """A batched inference callable that first checks each request of the batch: when any is
    refused (BadRequest), none runs and RefusedRequests carries each one's reason, which the
    patched proxy model answers request by request (pytriton_compat)."""
    def infer_requests(requests: list) -> list:
        reasons: list[str | None] = []
        for request in requests:
            try:
                check(request)
                reasons.append(None)
            except BadRequest as e:
                reasons.append(str(e))
        if any(reasons):
            from .pytriton_compat import RefusedRequests

            raise RefusedRequests(reasons)
        return infer(requests)

    return infer_requests


def loaded_at_start(triton_module: Any, workspace: str) -> dict[str, Any]:
    """Triton arguments that make it load every bound model before it opens its endpoints:
    PyTriton's default starts Triton first and loads the models one by one through its API, and
    meanwhile `/v2/health/ready` answers 200 between loads (issue 23). With a local model store
    (PyTriton's documented lifecycle policy, the one its Vertex AI mode uses) the models are
    written at `bind` and Triton loads them all at start (`--load-model=*`), so readiness never
    says ready before every model is."""
    policy = triton_module.TritonLifecyclePolicy(launch_triton_on_startup=False,
                                                 local_model_store=True)
    return {"workspace": str(Path(workspace) / "pytriton"), "triton_lifecycle_policy": policy}


def refusals_answered(pytriton_workspace: Path) -> bool:
    """Patch the proxy models PyTriton wrote to answer refused requests as client errors
    (pytriton_compat); False where this PyTriton is not the one the patch was made for."""
    from .pytriton_compat import patch_model_store

    return bool(patch_model_store(pytriton_workspace / "model-store"))


def serve(opts: ServeOptions, log: Callable[[str], None] = print) -> None:
    """Serve until SIGINT or SIGTERM (or until Triton or a model stops), then stop Triton.
    The signal handler only sets a flag: taking a lock there (threading.Event.set) can deadlock
    with the main thread's own wait on that lock."""
    stopping: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, _: stopping.append(signum))
    with started(opts, log) as server:
        server.run()  # the models load; returns once they are ready
        log("ready (GET /v2/health/ready; each model: GET /v2/models/NAME/ready)")
        while server.is_alive() and not stopping:
            time.sleep(0.5)
    log("stopped")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python export.py serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True,
                    help="artifact directory (engines/NAME) or a model file in one")
    ap.add_argument("--precision", help="which of the artifact's files (default fp16), or a "
                    "per-graph plan (name or GRAPH=PRECISION list): the whole model at the "
                    "plan's precision and, with --index, the plan's split graphs")
    ap.add_argument("--index", help="a clip index (`export.py index` with this artifact): "
                    "also serve twbert_retrieve, which ranks its clips for a text")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--instances", type=int, default=1, help="model instances (runners)")
    ap.add_argument("--max-batch", type=int, help="largest batch formed (default: exported max)")
    ap.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US,
                    help="how long the dynamic batcher waits to fill a batch (default "
                    f"{DEFAULT_QUEUE_DELAY_US}: docs/serving.md)")
    ap.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads per instance")
    args = ap.parse_args(argv)
    from ..trt.engine_manifest import EngineMismatch
    from ..util import MissingDependency

    opts = ServeOptions(args.artifact, args.precision, args.http_port, args.grpc_port,
                        args.metrics_port, args.instances, args.max_batch,
                        args.max_queue_delay_us, args.threads, args.index)
    try:
        serve(opts, log=lambda line: print(line, flush=True))
    except (ValueError, MissingDependency, EngineMismatch, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        print("hint: python export.py serve --help", file=sys.stderr)
        return 2
    return 0
