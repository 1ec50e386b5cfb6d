"""A model repository for the stock Triton Inference Server container, from an artifact.

    python export.py triton-repo --artifact engines/NAME --out REPO [--precision fp16]
                                 [--index INDEX] [--instances N] [--max-queue-delay-us U]
                                 [--force]

    REPO/twbert_model/config.pbtxt     platform "tensorrt_plan": the contract's inputs and
         twbert_model/1/model.plan     outputs (dims without the batch axis), max_batch_size and
                                       dynamic batching from the exported batch range, instance
                                       group(s) on the GPU; the engine copied in when the
                                       artifact has one (`export.py build` on the device)
    REPO/twbert_score/config.pbtxt     Python backend, BLS (`triton_bls.py`): video + text ->
         twbert_score/1/...            match probability, ITC similarity, ITM logits, frames;
    REPO/twbert_qa/...                 (QA artifacts) video + question -> answer, probability
                                       with tokenizer.json, answers.json and twbert_serving/ (the
                                       numpy-only modules tokenising and post-processing as
                                       `export.py serve` does)
    REPO/twbert_text/, twbert_select/,  (with --index INDEX, a clip index `export.py index` made
         twbert_fuse/                  with this artifact) the split graphs of the index's
                                       precision as engine models, configured as twbert_model
                                       from each graph's contract (`Manifest.contract_of`); the
                                       video_stem graph is left out: the index holds the stems
    REPO/twbert_retrieve/...           Python backend, BLS: text [+ k, top, shortlist] -> the
                                       ranking `predict --index --text` prints, computed by the
                                       same function (`clip_index.rank`) with each graph run on
                                       its engine model
    REPO/twbert_shard/...              (an --index that `export.py index-split` wrote) Python
                                       backend, no batch axis: the shard's identity, which
                                       `export.py query --shards` checks

The index is referenced, not copied (its stems may be large, and `export.py index` keeps
adding to it): twbert_retrieve's `index` parameter holds its absolute path, which the
container must see at that path (`-v INDEX:INDEX`); the model reads index.json when it loads
(reload it after adding clips) and checks that the index is still this artifact's.

The served models take and give what `export.py serve` binds, so `python -m twbert_export.serving.client`
works against either. Every config.pbtxt is parsed into Triton's ModelConfig protobuf
(tritonclient's `model_config_pb2`) after it is written, when tritonclient is installed.
The repository is assembled beside --out and moved into place; an existing --out is replaced
only if this command wrote it (its marker file) or it is empty.

Run it in the container: `docker run --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002
-v $PWD/REPO:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver
--model-repository=/models` (with `pip install numpy tokenizers` for the Python backend; the
engine must be built for the container's TensorRT and the GPU it runs on).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..artifact.manifest import PRECISIONS, Manifest
from ..artifact.plan import model_precision
from ..artifact.contract import BATCH, IOContract
from ..retrieval.shards import SHARD_FILE, shard_of
from .served import (QA_MODEL, QA_TEXT, RETRIEVE_MODEL, RETRIEVE_OPTIONAL, SCORE_MODEL,
                     SCORE_TEXT, SHARD_MODEL, retrieval_io)
from ..util import move_files, removed_afterwards, signals_deferred, write_json

ENGINE_MODEL = "twbert_model"
MARKER = ".twbert-triton-repo.json"  # says this command wrote the directory
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64",
                "int64": "TYPE_INT64", "int32": "TYPE_INT32", "bool": "TYPE_BOOL",
                "bytes": "TYPE_STRING"}
# Modules the BLS model imports, copied into <model>/1/twbert_serving/ at their places in the
# package (numpy-only, relative imports among themselves).
SERVING_MODULES = ("data/preprocess.py", "validation/metrics.py", "serving/served.py")
# And for twbert_retrieve: the index reader and `rank`, with what they import (numpy, stdlib).
RETRIEVAL_MODULES = SERVING_MODULES + ("retrieval/clip_index.py", "retrieval/first_stage.py",
                                       "retrieval/selection_stage.py", "artifact/contract.py",
                                       "util.py")
RETRIEVAL_GRAPHS = ("text", "select", "fuse")  # the stems come from the index
PACKAGE = Path(__file__).resolve().parents[1]  # twbert_export/


class TritonRepoError(ValueError):
    """An --out or artifact this command cannot or must not write from (exit 2)."""


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # numpy dtype name, or "bytes"
    dims: tuple[int, ...]  # without the batch axis; -1: variable (BLS outputs only)
    optional: bool = False  # an input a request may leave out


def tensor_block(kind: str, tensors: list[Tensor]) -> str:
    """An input or output list. A tensor with only the batch axis (itc_sim: one value per row)
    is given to Triton as dims [1] reshaped to [] (its documented form for such tensors)."""
    def dims(t: Tensor) -> str:
        if not t.dims:
            return "dims: [ 1 ] reshape: { shape: [ ] }"
        return f"dims: [ {', '.join(map(str, t.dims))} ]"

    items = ",\n".join(f'  {{ name: "{t.name}" data_type: {TRITON_TYPES[t.dtype]} {dims(t)}'
                       + (" optional: true" if t.optional else "") + " }"
                       for t in tensors)
    return f"{kind} [\n{items}\n]\n"


def model_config(name: str, head: str, max_batch: int, inputs: list[Tensor],
                 outputs: list[Tensor], instances: int, kind: str, queue_delay_us: int,
                 preferred: list[int], parameters: dict[str, str] | None = None) -> str:
    """A config.pbtxt (Triton's ModelConfig in protobuf text format); `max_batch` 0: a model
    without a batch axis, and without the dynamic batcher."""
    text = (f'name: "{name}"\n{head}\nmax_batch_size: {max_batch}\n'
            + tensor_block("input", inputs) + tensor_block("output", outputs)
            + ("dynamic_batching {\n"
               + (f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
                  if preferred else "")
               + f"  max_queue_delay_microseconds: {queue_delay_us}\n}}\n" if max_batch else "")
            + f"instance_group [ {{ count: {instances} kind: {kind} }} ]\n")
    for key, value in (parameters or {}).items():
        text += f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'
    return text


def unbatched(spec_shape: tuple) -> tuple[int, ...]:
    if spec_shape[0] != BATCH:
        raise TritonRepoError("the contract's first axis is not the batch axis")
    return tuple(int(d) for d in spec_shape[1:])


def engine_tensors(contract: IOContract, integer_io: str) -> tuple[list[Tensor], list[Tensor]]:
    """The engine's I/O as Triton sees it: the contract's, with INT64 narrowed to INT32 for a
    TensorRT 8.x engine (its parser has no INT64 I/O)."""
    def dtype(d: str) -> str:
        return integer_io if d == "int64" else d

    return ([Tensor(t.name, dtype(t.dtype), unbatched(t.shape)) for t in contract.inputs],
            [Tensor(t.name, dtype(t.dtype), unbatched(t.shape)) for t in contract.outputs])


def served_tensors(contract: IOContract, kind: str) -> tuple[list[Tensor], list[Tensor]]:
    """What `export.py serve` binds for the score or QA model (see serve.model_specs)."""
    video = Tensor("video", "float32", unbatched(contract.inputs[0].shape))
    if kind == "qa":
        return ([video, Tensor(QA_TEXT, "bytes", (1,))],
                [Tensor("answer", "bytes", (1,)), Tensor("probability", "float64", (1,)),
                 Tensor("answer_index", "int64", (1,))])
    outputs = [Tensor("match_probability", "float64", (1,)),
               Tensor("itc_similarity", "float32", (1,)), Tensor("itm_logits", "float32", (2,))]
    kept = next((t for t in contract.outputs if t.name == "frame_indices_2"), None)
    if kept is not None:
        outputs.append(Tensor("frames", "int64", unbatched(kept.shape)))
    return [video, Tensor(SCORE_TEXT, "bytes", (1,))], outputs


def retrieval_tensors(kept: int | None) -> tuple[list[Tensor], list[Tensor]]:
    """What `export.py serve --index` binds for twbert_retrieve (`served.retrieval_io`)."""
    inputs, outputs = retrieval_io(kept)
    return ([Tensor(*t, optional=t[0] in RETRIEVE_OPTIONAL) for t in inputs],
            [Tensor(*t) for t in outputs])


def check_config(text: str, where: str) -> str:
    """Parse a config.pbtxt into Triton's ModelConfig protobuf (unknown fields, wrong types and
    enum names fail) and check what the schema cannot say. Returns what was checked."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return "not parsed (tritonclient is not installed: pip install -r requirements-serve.txt)"
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise TritonRepoError(f"{where}: not a valid Triton model config ({e})") from None
    problems = []
    variable_outputs = config.backend == "python"  # a ranking's length is the request's
    if bool(config.platform) == bool(config.backend):
        problems.append("exactly one of platform and backend must be set")
    if config.max_batch_size < 1 and (config.name != SHARD_MODEL
                                      or config.HasField("dynamic_batching")):
        problems.append("max_batch_size must be >= 1 (batching models; twbert_shard alone has "
                        "no batch axis, and no dynamic batcher)")
    tensors = [(t, 1) for t in config.input]
    tensors += [(t, -1 if variable_outputs else 1) for t in config.output]
    for t, smallest in tensors:
        if not t.dims or any(d < smallest or d == 0 for d in t.dims):
            problems.append(f"{t.name}: dims must be fixed and positive, got {list(t.dims)}")
    preferred = config.dynamic_batching.preferred_batch_size
    if any(not 1 <= p <= config.max_batch_size for p in preferred):
        problems.append(f"preferred_batch_size {list(preferred)} outside 1..max_batch_size")
    if problems:
        raise TritonRepoError(f"{where}: {'; '.join(problems)}")
    return "parsed as Triton's ModelConfig (tritonclient model_config_pb2)"


def integer_io_of(engine: Path) -> str:
    """int32 for an engine built with TensorRT 8.x (from its sidecar), else int64."""
    sidecar = engine.with_name(engine.name + ".json")
    if sidecar.is_file():
        version = json.loads(sidecar.read_text()).get("machine", {}).get("tensorrt_version", "")
        if str(version).startswith("8."):
            return "int32"
    return "int64"


def check_out(out: Path, force: bool) -> None:
    if out.is_symlink():  # replacing it would replace the user's link, not what it points to
        raise TritonRepoError(f"--out {out} is a symbolic link (to {os.readlink(out)}): name "
                              "the directory itself")
    if out.exists() and not out.is_dir():
        raise TritonRepoError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise TritonRepoError(f"--out {out} is a non-empty directory this command did not "
                                  "write: name a new directory")
        if not force:
            raise TritonRepoError(f"--out {out} holds an earlier repository: add --force to "
                                  "replace it")


def engine_model(tmp: Path, name: str, contract: IOContract, engine: Path, instances: int,
                 queue_delay_us: int) -> str:
    """An engine model's directory (the engine copied in when it was built) and its config."""
    batch = contract.batch
    if batch.min != 1:
        raise TritonRepoError(f"{engine.stem}: the batch range starts at {batch.min}: Triton "
                              "sends batches from 1 (export with --batch 1:OPT:MAX)")
    inputs, outputs = engine_tensors(contract, integer_io_of(engine))
    (tmp / name / "1").mkdir(parents=True)
    if engine.is_file():
        shutil.copy2(engine, tmp / name / "1" / "model.plan")
    return model_config(name, 'platform: "tensorrt_plan"', batch.max, inputs, outputs,
                        instances, "KIND_GPU", queue_delay_us, sorted({batch.opt, batch.max}))


def bls_model_dir(tmp: Path, name: str, modules: tuple[str, ...], tokenizer: Path) -> Path:
    """A BLS model's version directory: model.py (`triton_bls.py`), the numpy-only modules in
    twbert_serving/ and the tokenizer."""
    version = tmp / name / "1"
    (version / "twbert_serving").mkdir(parents=True)
    shutil.copy2(PACKAGE / "serving" / "triton_bls.py", version / "model.py")
    (version / "twbert_serving" / "__init__.py").write_text("")
    for module in modules:
        target = version / "twbert_serving" / module
        if not target.parent.is_dir():  # a sub-package: empty __init__, only what is copied
            target.parent.mkdir()
            (target.parent / "__init__.py").write_text("")
        shutil.copy2(PACKAGE / module, target)
    shutil.copy2(tokenizer, version / "tokenizer.json")
    return version


def retrieval_models(tmp: Path, artifact_dir: Path, index: Path, instances: int,
                     queue_delay_us: int, plan: str | None = None
                     ) -> tuple[dict[str, str], list[Path]]:
    """The engine models of the split graphs that made the index (of `plan`, a per-graph plan,
    when given), and twbert_retrieve over them; returns the configs and the engines found."""
    from ..retrieval.clip_index import ClipIndex
    from ..retrieval.gallery import SplitArtifact
    from .serve import selected_frames

    split = SplitArtifact.for_index(artifact_dir, index, precision=plan)
    ClipIndex.open(index, split.identity, split.stem_shape)  # readable, of this artifact
    configs, engines, names = {}, [], {}
    integer_io = "int64"
    for graph in RETRIEVAL_GRAPHS:
        names[graph] = f"twbert_{graph}"
        engine = split.files[graph].with_suffix(".engine")
        configs[names[graph]] = engine_model(tmp, names[graph], split.contracts[graph], engine,
                                             instances, queue_delay_us)
        integer_io = integer_io_of(engine) if graph == "text" else integer_io
        engines += [engine] if engine.is_file() else []
    text = split.contracts["text"]
    served_in, served_out = retrieval_tensors(selected_frames(split))
    configs[RETRIEVE_MODEL] = model_config(
        RETRIEVE_MODEL, 'backend: "python"', text.batch.max, served_in, served_out, instances,
        "KIND_CPU", queue_delay_us, [],
        {"kind": "retrieve", "text_len": str(split.manifest.contract.text_len),
         "index": str(index.resolve()), "artifact_identity": split.identity,
         "stem_shape": ",".join(map(str, split.stem_shape)),
         "graph_models": ",".join(f"{g}={n}" for g, n in names.items()),
         "integer_io": integer_io})
    version = bls_model_dir(tmp, RETRIEVE_MODEL, RETRIEVAL_MODULES,
                            artifact_dir / split.manifest.tokenizer)
    write_json(version / "contracts.json", {g: split.contracts[g].to_dict()
                                            for g in RETRIEVAL_GRAPHS})
    identity = shard_of(index)  # ShardError (exit 2) for a shard changed since its split
    if identity is not None:  # twbert_shard, as `export.py serve --index SHARD` serves it
        configs[SHARD_MODEL] = model_config(
            SHARD_MODEL, 'backend: "python"', 0, [Tensor("probe", "int64", (1,), optional=True)],
            [Tensor("identity", "bytes", (1,))], 1, "KIND_CPU", queue_delay_us, [],
            {"kind": "shard", "index": str(index.resolve())})
        version = bls_model_dir(tmp, SHARD_MODEL, SERVING_MODULES,
                                artifact_dir / split.manifest.tokenizer)
        (version / SHARD_FILE).write_text(identity.to_json(), encoding="utf-8")
    return configs, engines


class AddedFilesKept(UserWarning):
    """Files added to a repository since this command wrote it were moved into the new one."""


def added_files(repo: Path, new: Path) -> list[str]:
    """Files (relative paths) in a repository this command wrote that it did not write: not in
    its marker's file list; for a marker without one (written before it was kept), not in the
    repository `new` replacing it either."""
    try:
        written = json.loads((repo / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        written = None
    found = sorted(str(p.relative_to(repo)) for p in repo.rglob("*")
                   if p.is_file() or p.is_symlink())
    if isinstance(written, list):
        return [f for f in found if f not in written]
    return [f for f in found if not (new / f).exists() and f != MARKER]


def carry_over_added(out: Path, new: Path, onnx_sha256: str) -> list[str]:
    """Move what was added to the repository `out` since it was written (the `model.plan` its
    output told the user to copy in, or anything else) into the repository `new` replacing it.
    Raises TritonRepoError, moving nothing, for an engine of a repository written from another
    ONNX file (it would not fit the new engine models), and for a file where `new` has one."""
    added = added_files(out, new)
    if not added:
        return []
    try:
        previous = json.loads((out / MARKER).read_text()).get("onnx_sha256")
    except (OSError, ValueError, AttributeError):
        previous = None
    stale = [f for f in added if Path(f).name == "model.plan" and previous != onnx_sha256]
    taken = [f for f in added if f not in stale and ((new / f).exists() or (new / f).is_symlink())]
    if stale or taken:
        why = ([f"{', '.join(stale)} (engines built for the ONNX file the repository was "
                f"written from, sha256 {str(previous)[:12]}; this artifact's is "
                f"{onnx_sha256[:12]})"] if stale else [])
        why += [f"{', '.join(taken)} (the new repository has files there)"] if taken else []
        raise TritonRepoError(f"--force would delete what was added to {out} since it was "
                              f"written: {'; '.join(why)}: move them out of {out} (or delete "
                              "them) and run again")
    move_files(added, out, new)
    warnings.warn(f"kept {', '.join(added)}, added to {out} since it was written: moved into "
                  "the new repository", AddedFilesKept, stacklevel=3)
    return added


def _return_carried(carried: list[str], tmp: Path, out: Path, old: Path) -> None:
    """Undo `carry_over_added` after a failed swap: the earlier repository back at `out`, the
    user's files back in it."""
    if old.is_dir() and not out.exists():
        os.replace(old, out)
    move_files([name for name in carried if (tmp / name).exists()], tmp, out)


def write_repo(artifact_dir: str | Path, out: str | Path, precision: str | None = None,
               instances: int = 1, queue_delay_us: int = 2000, force: bool = False,
               index: str | Path | None = None) -> dict[str, str]:
    """Write the repository; returns {config path: what checked it}."""
    artifact_dir, out = Path(artifact_dir), Path(out)
    manifest = Manifest.load(artifact_dir)
    contract = manifest.contract
    chosen = model_precision(manifest, precision) or (
        "fp16" if "fp16" in manifest.precisions else manifest.precisions[0])
    entry = manifest.file(chosen)
    if entry is None:
        raise TritonRepoError(f"--precision {chosen}: {artifact_dir} holds "
                              f"{', '.join(manifest.precisions)}")
    if instances < 1:
        raise TritonRepoError(f"--instances must be >= 1, got {instances}")
    check_out(out, force)
    engine = (artifact_dir / entry.path).with_suffix(".engine")
    batch = contract.batch
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftover of this pid only
    configs: dict[str, str] = {}
    with removed_afterwards(tmp):  # and by a Ctrl-C or SIGTERM: no half-written repository
        configs[ENGINE_MODEL] = engine_model(tmp, ENGINE_MODEL, contract, engine, instances,
                                             queue_delay_us)
        engines = [engine] if engine.is_file() else []
        kinds = [("score", SCORE_MODEL)]
        if contract.task == "qa" and manifest.answers:
            kinds.append(("qa", QA_MODEL))
        for kind, name in kinds:
            served_in, served_out = served_tensors(contract, kind)
            configs[name] = model_config(
                name, 'backend: "python"', batch.max, served_in, served_out, instances,
                "KIND_CPU", queue_delay_us, [],
                {"kind": kind, "engine_model": ENGINE_MODEL, "text_len": str(contract.text_len),
                 "engine_outputs": ",".join(t.name for t in contract.outputs)})
            version = bls_model_dir(tmp, name, SERVING_MODULES, artifact_dir / manifest.tokenizer)
            if kind == "qa":
                shutil.copy2(artifact_dir / str(manifest.answers), version / "answers.json")
        if index is not None:
            plan = None if precision is None or precision in PRECISIONS else precision
            retrieval, split_engines = retrieval_models(tmp, artifact_dir, Path(index),
                                                        instances, queue_delay_us, plan)
            configs.update(retrieval)
            engines += split_engines
        checked = {}
        for name, text in configs.items():
            (tmp / name / "config.pbtxt").write_text(text)
            checked[f"{out / name / 'config.pbtxt'}"] = check_config(text, f"{name}/config.pbtxt")
        write_json(tmp / MARKER, {"artifact": str(artifact_dir), "precision": chosen,
                                  "onnx_sha256": entry.sha256,
                                  "index": None if index is None else str(Path(index).resolve()),
                                  "engines": [e.name for e in engines],
                                  "files": sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")
                                                  if p.is_file()) + [MARKER]})
        out.parent.mkdir(parents=True, exist_ok=True)
        with signals_deferred():  # the swap is not stopped half-way
            if out.exists():  # ours (checked above): set aside, then removed once the new is in
                carried = carry_over_added(out, tmp, entry.sha256)
                old = out.with_name(f".{out.name}.{os.getpid()}.old")
                try:
                    os.replace(out, old)
                    os.replace(tmp, out)
                except OSError:  # the user's files go back before tmp is removed
                    _return_carried(carried, tmp, out, old)
                    raise
                shutil.rmtree(old)
            else:
                os.replace(tmp, out)
    return checked


def run_bundled_server(repo: str | Path, http_port: int, grpc_port: int, metrics_port: int,
                       workspace: str | Path) -> None:
    """Replace this process with the `tritonserver` that PyTriton ships (Python backend only, on
    the CPU), serving `repo` on loopback: the way to load a repository's Python-backend models
    here, where there is no Triton container. The server's files are laid out in `workspace` as
    PyTriton lays them out (the binaries, the Python-backend stub of this Python's version), and
    the stub loads this interpreter's libpython (serve.use_own_libpython)."""
    from .serve import LOOPBACK, pytriton, use_own_libpython

    pytriton()
    from pytriton.utils.distribution import get_libs_path, get_root_module_path, get_stub_path

    server = Path(workspace) / "tritonserver"
    shutil.copytree(get_root_module_path() / "tritonserver", server,
                    ignore=shutil.ignore_patterns("python_backend_stubs"))
    stub = get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}")
    shutil.copy(stub, server / "backends" / "python" / "triton_python_backend_stub")
    use_own_libpython()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (env.get("LD_LIBRARY_PATH"),
                                                  str(get_libs_path())) if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # the stub's Python
    binary = str(server / "bin" / "tritonserver")
    os.execve(binary, [
        binary, f"--model-repository={Path(repo).resolve()}",
        f"--backend-directory={server / 'backends'}", f"--http-address={LOOPBACK}",
        f"--http-port={http_port}", f"--grpc-address={LOOPBACK}", f"--grpc-port={grpc_port}",
        f"--metrics-address={LOOPBACK}", f"--metrics-port={metrics_port}",
        "--exit-on-error=true", "--log-verbose=0"], env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python export.py triton-repo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, help="artifact directory (engines/NAME)")
    ap.add_argument("--out", required=True, help="model repository directory to write")
    ap.add_argument("--precision", help="which of the artifact's files (default fp16), or a "
                    "per-graph plan (name or GRAPH=PRECISION list): the whole model at the "
                    "plan's precision and, with --index, the plan's split graphs")
    ap.add_argument("--index", help="a clip index (`export.py index` with this artifact): "
                    "also write twbert_retrieve and the split graphs' engine models")
    ap.add_argument("--instances", type=int, default=1, help="instances per model")
    ap.add_argument("--max-queue-delay-us", type=int, default=2000)
    ap.add_argument("--force", action="store_true", help="replace a repository written earlier")
    args = ap.parse_args(argv)
    try:
        checked = write_repo(args.artifact, args.out, args.precision, args.instances,
                             args.max_queue_delay_us, args.force, args.index)
    except (ValueError, FileNotFoundError) as e:  # TritonRepoError, ArtifactFormatError
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        print("hint: python export.py triton-repo --help", file=sys.stderr)
        return 2
    for path, how in checked.items():
        print(f"{path}: {how}")
    engine_models = [ENGINE_MODEL] + ([f"twbert_{g}" for g in RETRIEVAL_GRAPHS]
                                      if args.index else [])
    plans = [Path(args.out) / name / "1" / "model.plan" for name in engine_models]
    missing = [str(plan) for plan in plans if not plan.is_file()]
    if missing:
        print(f"no engine in {args.artifact} yet: build it on the device (export.py build) and "
              f"copy it to {', '.join(missing)}, or run triton-repo there")
    return 0


if __name__ == "__main__":
    # python -m twbert_export.serving.triton_repo --bundled-server REPO HTTP GRPC METRICS WORKSPACE
    if sys.argv[1:2] == ["--bundled-server"] and len(sys.argv) == 7:
        run_bundled_server(sys.argv[2], *map(int, sys.argv[3:6]), sys.argv[6])
    sys.exit(main())
