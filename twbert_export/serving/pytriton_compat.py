"""The one patch `export.py serve` makes to PyTriton: client errors answered as client errors.

PyTriton 0.7.0 turns any exception of an inference callable into an error for every request of
the batch, with Triton's code INTERNAL (HTTP 500, gRPC INTERNAL) and a message holding two Python
tracebacks with the server's file paths. It has no documented way to refuse a request as the
client's mistake (its PyTritonValidationError and PyTritonBadParameterError are configuration
errors; PyTritonUnrecoverableError stops the server). Triton's Python backend has one:
`pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)`, which Triton answers with HTTP
400 / gRPC INVALID_ARGUMENT, as it answers its own checks (a wrong shape or dtype).

So the callables of `serve` check each request of a batch first and raise `RefusedRequests` with
one reason per request (None: nothing wrong with it). The proxy model PyTriton runs inside
Triton (`pytriton/proxy/model.py`, copied into the model store) is patched to answer that
exception request by request: INVALID_ARG with the reason for a refused request, UNAVAILABLE
("send it again") for a request that was only batched with one. Any other exception keeps
PyTriton's own answer. Applied only to the PyTriton version it was tested with
(PATCHED_VERSIONS) and only where the patched lines are found as they were; elsewhere the model
store is left as PyTriton wrote it (refusals then come back as PyTriton's HTTP 500).
"""

from __future__ import annotations

import json
from pathlib import Path

PATCHED_VERSIONS = ("0.7.0",)
PROXY_MODEL = "model.py"
# What PyTriton 0.7.0's TritonPythonModel.execute does with the callable's exception.
ORIGINAL = """\
                if triton_responses_or_error is not None and isinstance(triton_responses_or_error, Exception):
                    raise triton_responses_or_error
"""
PATCHED = """\
                if triton_responses_or_error is not None and isinstance(triton_responses_or_error, Exception):
                    refused = _twbert_refused(triton_responses_or_error, len(triton_requests))
                    if refused is not None:
                        return refused
                    raise triton_responses_or_error
"""
MARKER = "RefusedRequests: "
NOT_RUN = ("not run: another request in its batch was refused (the batch is one model run); "
           "send it again")
HELPER = f'''

# -- added by twbert_export.serving.pytriton_compat: refused requests answered as INVALID_ARG ----------
def _twbert_refused(error, n):
    """Per-request error responses when the inference callable raised RefusedRequests (its
    traceback's last line carries one reason per request, JSON), else None."""
    import json as _json

    message = error.message() if callable(getattr(error, "message", None)) else str(error)
    lines = [line for line in str(message).splitlines() if line.strip()]
    if not lines or "{MARKER}" not in lines[-1]:
        return None
    try:
        reasons = _json.loads(lines[-1].split("{MARKER}", 1)[1])
    except ValueError:
        return None
    if not isinstance(reasons, list) or len(reasons) != n:
        return None
    invalid = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    unavailable = getattr(pb_utils.TritonError, "UNAVAILABLE", None)

    def error_of(reason):
        text, code = (reason, invalid) if reason else ({NOT_RUN!r}, unavailable)
        return pb_utils.TritonError(text) if code is None else pb_utils.TritonError(text, code)

    return [pb_utils.InferenceResponse(error=error_of(reason)) for reason in reasons]
'''


class RefusedRequests(Exception):
    """Requests of one batch that the model refuses: `reasons[i]` is why request i is refused,
    None for one refused only because it shares the batch. Its message is the reasons as one
    line of JSON, which the patched proxy model reads back."""

    def __init__(self, reasons: list[str | None]):
        self.reasons = reasons
        super().__init__(json.dumps(reasons))


def patch_text(text: str) -> str | None:
    """The proxy model's source with refusals answered per request, or None where the lines to
    patch are not there exactly once (another PyTriton)."""
    if text.count(ORIGINAL) != 1:
        return None
    return text.replace(ORIGINAL, PATCHED) + HELPER


def unpatch_text(text: str) -> str:
    """The inverse of patch_text (the test that the patch changes nothing else uses it)."""
    return text.removesuffix(HELPER).replace(PATCHED, ORIGINAL)


def pytriton_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nvidia-pytriton")
    except PackageNotFoundError:
        return None


def patch_model_store(model_store: str | Path) -> list[str]:
    """Patch the proxy model of every model in a PyTriton model store (before Triton loads
    them). Returns the models patched; none on a PyTriton version not in PATCHED_VERSIONS."""
    if pytriton_version() not in PATCHED_VERSIONS:
        return []
    patched = []
    for source in sorted(Path(model_store).glob(f"*/*/{PROXY_MODEL}")):
        text = patch_text(source.read_text())
        if text is not None:
            source.write_text(text)
            patched.append(source.parent.parent.name)
    return patched
