"""Serve an artifact on Triton Inference Server, with the models bound in-process through NVIDIA's
PyTriton (`nvidia-pytriton`: a real `tritonserver` with its Python backend; KServe v2 HTTP/gRPC,
dynamic batching, model instances, health, metrics and statistics endpoints).

    python export.py serve --artifact engines/NAME [--http-port 8000] [--grpc-port 8001]
                           [--instances N] [--max-batch B] [--max-queue-delay-us U]

Models (each request is one row; Triton's dynamic batcher joins concurrent rows into batches
within the exported batch range, which the runner takes in one call):
- `twbert_score`: `video` FP32 (T, 3, S, S) + `text` BYTES (1,) -> `match_probability` FP64 (1,),
  `itc_similarity` FP32 (1,), `itm_logits` FP32 (2,) and, with frame selection, `frames` INT64
  (K2,): the numbers `predict --text` ranks by, computed as it computes them.
- `twbert_qa` (QA artifacts): `video` + `question` BYTES (1,) -> `answer` BYTES (1,),
  `probability` FP64 (1,), `answer_index` INT64 (1,): what `predict --question` prints.
Clients send decoded clips (`preprocess.load_video`, as predict does) and raw text; the server
tokenises with the artifact's tokenizer. Triton itself refuses a wrong shape or dtype; an empty
text gets an error response from the model. Either way the server stays up.

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

from .artifact import Manifest
from .predict import Artifact
from .runners import batched, run_batches
from .served import (QA_MODEL, QA_TEXT, SCORE_MODEL, SCORE_TEXT, answer_outputs,
                     score_outputs, texts_of)
from .util import require

LOOPBACK = "127.0.0.1"
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
    max_queue_delay_us: int = 2000
    threads: int | None = None  # ONNX Runtime intra-op threads per instance


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
    chosen = precision or ("fp16" if "fp16" in manifest.precisions else manifest.precisions[0])
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
    compute: Callable[[ArtifactModel], Callable[..., dict[str, np.ndarray]]]


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
    path = model_file(opts.artifact, opts.precision)
    artifact = Artifact(path)
    c = artifact.contract
    max_batch = opts.max_batch or c.batch.max
    if not 1 <= max_batch <= c.batch.max:
        raise ValueError(f"--max-batch {max_batch} is outside the exported batch range "
                         f"1..{c.batch.max}")
    if opts.instances < 1:
        raise ValueError(f"--instances must be >= 1, got {opts.instances}")
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
        # One runner per instance (activation checks the file: contract, hash, engine preflight).
        models = [ArtifactModel(artifact, stack.enter_context(artifact.runner(opts.threads)))
                  for _ in range(opts.instances)]
        server = stack.enter_context(triton_module.Triton(config=config,
                                                          security_config=security))
        for spec in specs:
            server.bind(
                model_name=spec.name,
                infer_func=[decorators.batch(spec.compute(m)) for m in models],
                inputs=[model_config.Tensor(name=n, dtype=d, shape=s) for n, d, s in spec.inputs],
                outputs=[model_config.Tensor(name=n, dtype=d, shape=s)
                         for n, d, s in spec.outputs],
                config=model_config.ModelConfig(
                    max_batch_size=max_batch,
                    batcher=model_config.DynamicBatcher(
                        max_queue_delay_microseconds=opts.max_queue_delay_us)),
                strict=True)
        runtime = "TensorRT" if path.suffix == ".engine" else "ONNX Runtime"
        log(f"serving {path} ({runtime}, task {c.task}, F@{c.schedule}): "
            f"{', '.join(s.name for s in specs)}; batches up to {max_batch}, queue delay "
            f"{opts.max_queue_delay_us} us, {opts.instances} instance(s)")
        log(f"  http://{LOOPBACK}:{opts.http_port}  grpc {LOOPBACK}:{opts.grpc_port}  "
            f"metrics http://{LOOPBACK}:{opts.metrics_port}/metrics  "
            f"Triton's log: {log_file}")
        yield server


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
    ap.add_argument("--precision", help="which of the artifact's files (default fp16)")
    ap.add_argument("--index", help="clip index for the retrieval model (needs the split "
                    "graphs in the artifact: not written by the export yet)")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--instances", type=int, default=1, help="model instances (runners)")
    ap.add_argument("--max-batch", type=int, help="largest batch formed (default: exported max)")
    ap.add_argument("--max-queue-delay-us", type=int, default=2000,
                    help="how long the dynamic batcher waits to fill a batch")
    ap.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads per instance")
    args = ap.parse_args(argv)
    from .trt.engine_manifest import EngineMismatch
    from .util import MissingDependency

    if args.index:
        print("error: --index: the retrieval model over a clip index needs the split graphs in "
              "the artifact, which the export does not write yet (docs/split.md, 'For wiring')",
              file=sys.stderr)
        return 2
    opts = ServeOptions(args.artifact, args.precision, args.http_port, args.grpc_port,
                        args.metrics_port, args.instances, args.max_batch,
                        args.max_queue_delay_us, args.threads)
    try:
        serve(opts, log=lambda line: print(line, flush=True))
    except (ValueError, MissingDependency, EngineMismatch, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0
