"""One query over the shards of a split clip index, each served by its own `export.py serve
--index SHARD`: tritonclient's asyncio clients (gRPC or HTTP) ask every shard at once, and the
shards' rankings merge into the ranking of the unsplit index (`retrieval.shards`).

    python export.py query --shards HOST:PORT,HOST:PORT,... --text "a caption" [--k 50]
                           [--top N] [--protocol http|grpc] [--json]

Before any query, every server is asked which shard it serves (`twbert_shard`, its shard.json);
a list with a missing, repeated or foreign shard, or a server that serves no shard, is refused
in one line (exit 2) and no shard is queried. Then each shard gets one `twbert_retrieve` request
with the same k (and top = max(k, top)); the merge keys each clip by its row in the source index
(the shard's first row + `index_rows`), so ties go where the unsplit index puts them. Prints what
`predict --index --exact --text` prints (`--json`: the same JSON): shards rank exactly.

Why on the client and not in a BLS model: a BLS model calls models of its own Triton server
only, and the shards are on other servers; the fan-out is a client of each (docs/serving.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, Sequence

import numpy as np

from ..retrieval.clip_index import RankedClip
from ..retrieval.shards import (ShardError, ShardHit, ShardIdentity, check_shard_list,
                                merge_rankings, shard_request)
from ..util import MissingDependency, require
from .client import TRITON_DTYPES, ServerError, error_line
from .served import RETRIEVE_MODEL, SCORE_TEXT, SHARD_MODEL

QUERY_HINT = "python export.py query --help"


class ShardServer:
    """An asyncio tritonclient of one server."""

    def __init__(self, url: str, protocol: str, timeout_s: float):
        if protocol not in ("http", "grpc"):
            raise ValueError(f"--protocol must be http or grpc, got {protocol!r}")
        self.url, self.protocol, self.timeout_s = url, protocol, timeout_s
        self.module = require(f"tritonclient.{protocol}", "for the Triton client")
        aio = require(f"tritonclient.{protocol}.aio", "for the Triton client")
        self.client = aio.InferenceServerClient(url, conn_timeout=timeout_s) \
            if protocol == "http" else aio.InferenceServerClient(url)
        self.exact: dict[str, np.ndarray] = {}  # what asks twbert_retrieve for the exact ranking

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]
                    ) -> dict[str, np.ndarray | None]:
        """One request; ServerError when the server refuses it or cannot be reached."""
        tensors = []
        for name, array in inputs.items():
            tensor = self.module.InferInput(name, list(array.shape), TRITON_DTYPES[array.dtype])
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            result = await self.client.infer(model, tensors, **kwargs)
        except Exception as e:  # refusals and connection errors share no base class
            raise ServerError(f"{self.url}: {model}: {error_line(e)}") from None
        return {name: result.as_numpy(name) for name in outputs}

    async def metadata(self, model: str) -> dict[str, Any]:
        kwargs = {"as_json": True} if self.protocol == "grpc" else {}
        try:
            return await self.client.get_model_metadata(model, **kwargs)
        except Exception as e:  # as in `infer`
            raise ServerError(f"{self.url}: {model}: {error_line(e)}") from None

    async def ask_exact(self) -> None:
        """Note whether this server's twbert_retrieve takes `shortlist` (the retrieval
        cascade's first stage): it is then asked for the exact ranking (0), the one whose
        merge equals the unsplit index's."""
        metadata = await self.metadata(RETRIEVE_MODEL)
        self.exact = {"shortlist": np.array([[0]], np.int64)} \
            if any(i["name"] == "shortlist" for i in metadata.get("inputs", [])) else {}

    async def identity(self) -> ShardIdentity | None:
        """The shard this server serves; None when it serves an index that is not a shard."""
        try:
            await self.ask_exact()
            out = await self.infer(SHARD_MODEL, {}, ["identity"])
        except ServerError as e:
            if "unknown model" in str(e) or "not found" in str(e):
                return None
            raise
        identity = out["identity"]
        if identity is None:
            raise ServerError(f"{self.url}: {SHARD_MODEL} gave no identity")
        return ShardIdentity.from_json(identity.reshape(-1)[0].decode("utf-8"),
                                       f"{self.url} ({SHARD_MODEL})")

    async def ranking(self, text: str, k: int, top: int, first: int) -> list[ShardHit]:
        """This shard's ranking for `text` as hits keyed by their row in the source index."""
        names = ["clips", "match_probability", "itc_similarity", "shortlisted", "index_rows",
                 "frames"]
        out = await self.infer(RETRIEVE_MODEL, {
            SCORE_TEXT: np.array([[text.encode("utf-8")]], dtype=np.object_),
            "k": np.array([[k]], np.int64), "top": np.array([[top]], np.int64), **self.exact},
            names)
        if out["index_rows"] is None:
            raise ShardError(f"{self.url}: {RETRIEVE_MODEL} gives no index_rows (a server from "
                             "before shards: update it)")
        frames = out["frames"]
        return [ShardHit(RankedClip(clip.decode("utf-8"), float(itc),
                                    float(itm) if scored else None,
                                    None if frames is None else frames[0, i].tolist()),
                         first + int(row))
                for i, (clip, itm, itc, scored, row) in enumerate(zip(
                    out["clips"][0], out["match_probability"][0], out["itc_similarity"][0],
                    out["shortlisted"][0], out["index_rows"][0]))]

    async def close(self) -> None:
        await self.client.close()


async def gathered(calls: Any) -> list[Any]:
    """Every call's result, run at once; when any fail, all have ended and one error names
    each failure."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if not failed:
        return results
    if len(failed) == 1 or not all(isinstance(f, ServerError) for f in failed):
        raise failed[0]
    raise ServerError("; ".join(str(f) for f in failed))


class ShardFanout:
    """The servers of one split index, checked as its complete shard list on entry (nothing is
    queried otherwise); `rank` asks them all at once and merges."""

    def __init__(self, urls: Sequence[str], protocol: str = "http", timeout_s: float = 60.0):
        if not urls:
            raise ShardError("--shards names no server")
        self.urls, self.protocol, self.timeout_s = list(urls), protocol, timeout_s
        self.servers: list[ShardServer] = []
        self.shards: list[tuple[ShardIdentity, ShardServer]] = []

    async def __aenter__(self) -> "ShardFanout":
        try:
            self.servers = [ShardServer(url, self.protocol, self.timeout_s) for url in self.urls]
            identities = await gathered(s.identity() for s in self.servers)
            check_shard_list(identities, self.urls)
        except BaseException:
            await self.__aexit__()
            raise
        self.shards = sorted(zip(identities, self.servers), key=lambda pair: pair[0].shard)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.gather(*(s.close() for s in self.servers), return_exceptions=True)

    async def rank(self, text: str, k: int = 50, top: int | None = None) -> list[RankedClip]:
        shard_k, shard_top = shard_request(k, top)
        rankings = await gathered(server.ranking(text, shard_k, shard_top, identity.first)
                                  for identity, server in self.shards)
        return merge_rankings(rankings, k, top)


async def fanout_ranking(urls: Sequence[str], text: str, k: int = 50, top: int | None = None,
                         protocol: str = "http", timeout_s: float = 60.0) -> list[RankedClip]:
    async with ShardFanout(urls, protocol, timeout_s) as fanout:
        return await fanout.rank(text, k, top)


def main(argv: list[str] | None = None) -> int:
    from ..retrieval.gallery import ranking_lines, ranking_result

    ap = argparse.ArgumentParser(prog="python export.py query", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True,
                    help="HOST:PORT of each shard's server, comma-separated (any order)")
    ap.add_argument("--text", required=True, help="caption to rank the clips for")
    ap.add_argument("--k", type=int, default=50, help="ITC shortlist re-ranked by ITM")
    ap.add_argument("--top", type=int, help="print only the N best clips")
    ap.add_argument("--protocol", choices=["http", "grpc"], default="http")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    urls = [u.strip() for u in args.shards.split(",") if u.strip()]
    try:
        if not args.text.strip():
            raise ValueError("--text is empty: give the caption to rank the clips for")
        if args.k < 1:
            raise ValueError(f"--k must be >= 1, got {args.k}")
        if args.top is not None and args.top < 0:
            raise ValueError(f"--top must be >= 0, got {args.top}")
        ranked = asyncio.run(fanout_ranking(urls, args.text, args.k, args.top, args.protocol,
                                            args.timeout))
    except (ValueError, ServerError, MissingDependency) as e:  # ShardError is a ValueError
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        print(f"hint: {QUERY_HINT}", file=sys.stderr)
        return 2
    result = ranking_result(args.text, ranked)
    print(json.dumps(result, indent=2) if args.json else "\n".join(ranking_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
