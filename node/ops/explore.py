"""The gap explorer: /explore (one HTML page) and its JSON under /api/ (docs/DESIGN-NOTES.md).

Read-only. It shows what the history is made of — embeddings projected to two
dimensions (``rewards.explore``), modality, round, short item ids — and never
a submitted byte. Served only when ``http.explore`` is true.

- ``GET /api/points``: the map, recomputed off the event loop after each
  committed round from a deterministic sample of at most ``http.explore_sample``
  items, plus the items paid in the last ``http.explore_paid_rounds`` rounds.
- ``POST /api/whatif``: a caption, a picture, or both (multipart/form-data
  fields ``caption`` and ``picture``, or JSON ``{"caption": ...}``), judged by
  the live scoring path: decoded in the submissions' sandbox with their caps,
  encoded by the node's encoder service with the current epoch's beacon,
  fused when a pair, and scored against the history by ``score_round`` as if
  alone in the next round. Nothing is stored. Rate-limited per client address.
- ``GET /api/gaps?top=N&near=CAPTION&modality=M``: the largest open gaps.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import numpy as np
import numpy.typing as npt
from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from consensus.committee import Committee
from encoders.errors import EncoderError
from encoders.modality import Modality
from node.intake.admission import RateLimiter
from node.intake.wire import Item, Submission
from node.ops.config import Config
from node.rounds.records import (
    Candidate,
    Prepared,
    RoundRules,
    from_float16,
    judge_alone,
    score_round,
)
from node.store.thread import StoreThread
from rewards.curiosity import neighbourhoods
from rewards.explore import Projection, fit_projection, item_key, open_gaps, sample_ids
from rewards.history import History

log = logging.getLogger("poc.explore")

NEIGHBOURS_SHOWN = 8
"""Of an answer's k nearest, this many are listed (nearest first)."""
GAP_SEEDS = 64
"""Open gaps are looked for around at most this many items of the map's sample: two
searches of this many queries under the history lock (about 0.3 s each at 1M items,
bench/bench_knn.py), once per history and filter; served from a cache after that."""
MAX_TOP = 100
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
WHATIF_ID = b"\x00" * 32
"""The submission id of a what-if: it sorts first, so it is scored as if alone first."""


class BadInput(Exception):
    """A what-if the explorer refuses; the message names the problem (HTTP 400)."""


class Busy(Exception):
    """Another what-if is being judged (HTTP 429): they never queue up in the node."""


Prepare = Callable[[Submission, int], Awaitable[Prepared]]


def short_id(submission_id: bytes, item: int) -> str:
    return f"{submission_id[:6].hex()}/{item}"


def sniff_image(data: bytes) -> str:
    """The media type of a picture by its first bytes (PNG or JPEG), or BadInput."""
    if data.startswith(PNG_MAGIC):
        return "image/png"
    if data.startswith(JPEG_MAGIC):
        return "image/jpeg"
    raise BadInput("picture is not an image: a PNG or JPEG file is expected")


def whatif_items(
    caption: str | None, picture: bytes | None, text_bytes: int, image_bytes: int
) -> tuple[Item, ...]:
    """The items of a what-if, checked like a submission's before decoding (caption first)."""
    items = []
    if caption is not None:
        data = caption.encode("utf-8")
        if not caption.strip():
            raise BadInput("caption is empty")
        if len(data) > text_bytes:
            raise BadInput(
                f"caption is too large: {len(data)} bytes, limits.text_bytes is {text_bytes}"
            )
        items.append(Item(Modality.TEXT, "text/plain", data, hashlib.sha256(data).digest()))
    if picture is not None:
        if not picture:
            raise BadInput("picture is empty")
        if len(picture) > image_bytes:
            raise BadInput(
                f"picture is too large: {len(picture)} bytes, limits.image_bytes is {image_bytes}"
            )
        mime = sniff_image(picture)
        items.append(Item(Modality.IMAGE, mime, picture, hashlib.sha256(picture).digest()))
    if not items:
        raise BadInput("nothing to judge: give a caption, a picture, or both")
    return tuple(items)


@dataclass(frozen=True)
class Snapshot:
    """The map as last computed."""

    round: int
    history_size: int
    sample_size: int
    projection: Projection
    points: list[dict[str, Any]]
    sample: npt.NDArray[np.int64]


def _coordinates(xy: npt.NDArray[np.float64]) -> list[float]:
    return [round(float(xy[0]), 6), round(float(xy[1]), 6)]


class _Labels:
    """Who each history id is: genesis items first, then certified items in commit order.

    Sample keys live in a growable uint64 array, so that choosing the sample
    of a large history costs one numpy sort, not a conversion.
    """

    def __init__(self) -> None:
        self.genesis = 0
        self.rounds: list[int] = []
        self.ids: list[str] = []
        self._keys = np.empty(1024, dtype=np.uint64)

    @property
    def keys(self) -> npt.NDArray[np.uint64]:
        return self._keys[: len(self.rounds)]

    def _key(self, key: int) -> None:
        size = len(self.rounds)
        if size == len(self._keys):
            grown = np.empty(2 * size, dtype=np.uint64)
            grown[:size] = self._keys
            self._keys = grown
        self._keys[size] = key

    def add_genesis(self, count: int) -> None:
        self.genesis = count
        for index in range(count):
            self._key(item_key(b"genesis" + index.to_bytes(8, "big")))
            self.rounds.append(-1)
            self.ids.append(f"genesis/{index}")

    def add(self, round_number: int, submission_id: bytes, item: int) -> None:
        self._key(item_key(submission_id + bytes([item])))
        self.rounds.append(round_number)
        self.ids.append(short_id(submission_id, item))

    def __len__(self) -> int:
        return len(self.rounds)


class Explorer:
    """The explorer's state and computations; the HTTP layer is ``add_routes``."""

    def __init__(
        self,
        config: Config,
        history: History,
        history_lock: asyncio.Lock,
        rules: RoundRules,
        prepare: Prepare,
        store: StoreThread,
        committee: Committee,
    ) -> None:
        self._config = config
        self._history = history
        self._lock = history_lock
        self._rules = rules
        self._prepare = prepare
        self._store = store
        self._committee = committee
        self._labels = _Labels()
        self._paid: dict[int, int] = {}  # history id -> round it was paid in
        self._last_round = -1
        self._snapshot: Snapshot | None = None
        self._changed = asyncio.Event()
        self._gaps_cache: dict[tuple[int, str | None, int], list[dict[str, Any]]] = {}
        self._busy = asyncio.Semaphore(1)

    @property
    def busy(self) -> bool:
        """A what-if (or a search near a caption) is being judged."""
        return self._busy.locked()

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    async def load(self) -> None:
        """Label the history as loaded (call before any round commits)."""
        rows = await self._store.call(lambda db: db.history_labels())
        last = await self._store.call(lambda db: db.last_round())
        self._last_round = -1 if last is None else last.round
        first = self._last_round - self._config.http.explore_paid_rounds + 1
        paid = await self._store.call(lambda db: db.paid_since(first))
        paid_in = dict((identity, round_number) for round_number, identity in paid)
        genesis = len(self._history) - len(rows)

        def label() -> _Labels:  # a large history takes seconds: off the event loop
            labels = _Labels()
            labels.add_genesis(genesis)
            for position, (round_number, identity, item) in enumerate(rows):
                labels.add(round_number, identity, item)
                if identity in paid_in:
                    self._paid[genesis + position] = paid_in[identity]
            return labels

        self._labels = await asyncio.to_thread(label)
        self._changed.set()

    def committed(
        self, round_number: int, joined: list[tuple[bytes, int]], paid: set[bytes]
    ) -> None:
        """``RoundDriver``'s ``on_committed``: label the new items, then refresh the map."""
        start = len(self._labels)
        for offset, (identity, item) in enumerate(joined):
            self._labels.add(round_number, identity, item)
            if identity in paid:
                self._paid[start + offset] = round_number
        self._last_round = max(self._last_round, round_number)
        oldest = self._last_round - self._config.http.explore_paid_rounds + 1
        kept = {i: r for i, r in self._paid.items() if r >= oldest}
        if joined or kept != self._paid:  # an empty round changes nothing on the map
            self._paid = kept
            self._changed.set()

    async def run(self) -> None:
        """Recompute the map whenever a round committed (one worker thread at a time)."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self.refresh()
            except Exception:  # the explorer never stops the node
                log.exception("event=explore_refresh_failed")

    async def refresh(self) -> None:
        sample_size = self._config.http.explore_sample
        async with self._lock:
            size = len(self._history)
            if size != len(self._labels):  # pragma: no cover - a bug, not an input
                log.error("event=explore_out_of_step history=%d labels=%d", size, len(self._labels))
                return
            paid = np.asarray(sorted(self._paid), dtype=np.int64)

            def read() -> tuple[Any, ...]:
                sample = sample_ids(self._labels.keys, sample_size)
                shown = np.union1d(sample, paid).astype(np.int64)
                return sample, shown, self._history.vectors(shown), self._history.modality_of(shown)

            sample, shown, vectors, modalities = await asyncio.to_thread(read)
        last_round = self._last_round
        labels, paid_rounds = self._labels, dict(self._paid)

        def compute() -> Snapshot:
            in_sample = np.isin(shown, sample)
            projection = fit_projection(vectors[in_sample])
            xy = projection.apply(vectors) if len(shown) else np.empty((0, 2))
            points = [
                {
                    "id": labels.ids[i],
                    "modality": modality,
                    "round": None if labels.rounds[i] < 0 else labels.rounds[i],
                    "x": round(float(xy[row, 0]), 6),
                    "y": round(float(xy[row, 1]), 6),
                    "paid": i in paid_rounds,
                }
                for row, (i, modality) in enumerate(zip(shown.tolist(), modalities, strict=True))
            ]
            return Snapshot(last_round, size, len(sample), projection, points, sample)

        self._snapshot = await asyncio.to_thread(compute)
        self._gaps_cache.clear()

    def points(self) -> dict[str, Any]:
        snapshot = self._snapshot
        if snapshot is None:
            raise LookupError("the map is not computed yet")
        counts: dict[str, int] = {}
        for point in snapshot.points:
            counts[point["modality"]] = counts.get(point["modality"], 0) + 1
        return {
            "round": None if snapshot.round < 0 else snapshot.round,
            "history_size": snapshot.history_size,
            "sample_size": snapshot.sample_size,
            "sample_limit": self._config.http.explore_sample,
            "paid_rounds": self._config.http.explore_paid_rounds,
            "count": len(snapshot.points),
            "modalities": counts,
            "points": snapshot.points,
        }

    # -- what-if -------------------------------------------------------------

    async def _prepared(self, items: tuple[Item, ...]) -> Prepared:
        """Decode (sandbox), encode (the encoder service) and fuse, as intake does."""
        submission = Submission(bytes(32), 0, 0, items, b"", b"")
        epoch = self._committee.epoch_of(max(self._last_round + 1, 0))
        try:
            return await self._prepare(submission, epoch)
        except EncoderError as error:
            raise BadInput(f"{error.reason}: {error}") from None

    def _neighbours(
        self, ids: npt.NDArray[np.int64], distances: npt.NDArray[np.float64], projection: Projection
    ) -> list[dict[str, Any]]:
        shown = ids[:NEIGHBOURS_SHOWN]
        xy = projection.apply(self._history.vectors(shown))
        modalities = self._history.modality_of(shown)
        return [
            {
                "id": self._labels.ids[i],
                "modality": modality,
                "round": None if self._labels.rounds[i] < 0 else self._labels.rounds[i],
                "x": _coordinates(xy[row])[0],
                "y": _coordinates(xy[row])[1],
                "distance": round(float(distances[row]), 6),
            }
            for row, (i, modality) in enumerate(zip(shown.tolist(), modalities, strict=True))
        ]

    async def whatif(self, caption: str | None, picture: bytes | None) -> dict[str, Any]:
        """Judge a caption and/or a picture as the next round would; nothing is kept."""
        limits = self._config.limits
        items = whatif_items(caption, picture, limits.text_bytes, limits.image_bytes)
        snapshot = self._snapshot
        if snapshot is None:
            raise LookupError("the map is not computed yet")
        if self._busy.locked():
            raise Busy("busy: the node judges one what-if at a time; try again shortly")
        async with self._busy:
            prepared = await self._prepared(items)
            certified = await self._store.accepted_hashes([item.sha256 for item in items])
            async with self._lock:
                return await asyncio.to_thread(self._judge, prepared, certified, snapshot)

    def _judge(
        self, prepared: Prepared, certified: set[bytes], snapshot: Snapshot
    ) -> dict[str, Any]:
        record = score_round(
            [Candidate(WHATIF_ID, bytes(32), prepared)], self._history, self._rules, certified
        )[0]
        verdicts = judge_alone(prepared, self._history, self._rules, certified)
        vectors = np.stack([from_float16(item.vector) for item in prepared.items])
        around = neighbourhoods(self._history, vectors, self._rules.scoring.k)
        xy = snapshot.projection.apply(vectors.astype(np.float64))
        ratio = self._rules.scoring.qualify_ratio
        answers = []
        for row, item in enumerate(prepared.items):
            verdict = verdicts[row] if verdicts else None
            answer: dict[str, Any] = {
                "modality": str(item.modality),
                "fused": item.fused,
                "x": _coordinates(xy[row])[0],
                "y": _coordinates(xy[row])[1],
                "duplicate": None if verdict is None else verdict.duplicate,
                "qualified": None if verdict is None else verdict.gap.qualified,
                "gap": None if verdict is None else round(verdict.gap.d_nn, 6),
                "distance_to_centre": None if verdict is None else round(verdict.gap.d_e, 6),
                "qualify_limit": None if verdict is None else round(verdict.gap.d_nn * ratio, 6),
                "score_ppm": None if verdict is None else verdict.gap.score_ppm,
                "nearest_same_modality": None if verdict is None else round(verdict.nearest, 6),
                "neighbours": (
                    self._neighbours(around[row].ids, around[row].distances, snapshot.projection)
                    if around
                    else []
                ),
            }
            answers.append(answer)
        qualifies = record.status == "final" and any(
            not verdict.duplicate and verdict.gap.qualified for verdict in verdicts
        )
        return {
            "would_qualify": qualifies,
            "status": record.status,
            "reason": None if record.reason is None else str(record.reason),
            "score_ppm": record.score,
            "scores_ppm": None if record.scores_ppm is None else list(record.scores_ppm),
            "pair_distance_ppm": prepared.pair_distance_ppm,
            "epoch": prepared.epoch,
            "history_size": len(self._history),
            "k": self._rules.scoring.k,
            "qualify_ratio": ratio,
            "items": answers,
        }

    # -- gaps ----------------------------------------------------------------

    def gaps_cached(self, top: int, modality: str | None) -> bool:
        """Whether ``gaps(top, None, modality)`` is answered from the cache (costs nothing)."""
        snapshot = self._snapshot
        return snapshot is not None and (snapshot.history_size, modality, top) in self._gaps_cache

    async def gaps(self, top: int, near: str | None, modality: str | None) -> dict[str, Any]:
        snapshot = self._snapshot
        if snapshot is None:
            raise LookupError("the map is not computed yet")
        key = (snapshot.history_size, modality, top)
        if near is None and key in self._gaps_cache:
            return self._result_of_gaps(snapshot, self._gaps_cache[key], near, modality)
        query = None
        if near is not None:
            if self._busy.locked():
                raise Busy("busy: the node judges one what-if at a time; try again shortly")
            async with self._busy:
                prepared = await self._prepared(whatif_items(near, None, *self._text_image()))
            query = from_float16(prepared.items[0].vector)[None, :]
        async with self._lock:
            found = await asyncio.to_thread(self._gaps, snapshot, top, query, modality)
        if near is None:
            self._gaps_cache[key] = found
        return self._result_of_gaps(snapshot, found, near, modality)

    def _text_image(self) -> tuple[int, int]:
        return self._config.limits.text_bytes, self._config.limits.image_bytes

    def _result_of_gaps(
        self,
        snapshot: Snapshot,
        found: list[dict[str, Any]],
        near: str | None,
        modality: str | None,
    ) -> dict[str, Any]:
        return {
            "round": None if snapshot.round < 0 else snapshot.round,
            "history_size": snapshot.history_size,
            "k": self._rules.scoring.k,
            "near": near,
            "modality": modality,
            "gaps": found,
        }

    def _gaps(
        self,
        snapshot: Snapshot,
        top: int,
        query: npt.NDArray[Any] | None,
        modality: str | None,
    ) -> list[dict[str, Any]]:
        history, k = self._history, self._rules.scoring.k
        if query is None:
            seeds = snapshot.sample
        else:
            around = neighbourhoods(history, query, k)
            seeds = np.sort(around[0].ids) if around else np.empty(0, dtype=np.int64)
        if modality is not None and len(seeds):
            kinds = history.modality_of(seeds)
            seeds = seeds[[kind == modality for kind in kinds]]
        if len(seeds) > GAP_SEEDS:  # the sample's smallest keys: deterministic
            keys = self._labels.keys[seeds]
            seeds = np.sort(seeds[np.lexsort((seeds, keys))[:GAP_SEEDS]])
        vectors = history.vectors(seeds)
        if query is not None:  # the caption itself proposes the first centre
            vectors = np.concatenate([query.astype(np.float64), vectors])
        kinds = ([Modality.TEXT.value] if query is not None else []) + history.modality_of(seeds)
        found = open_gaps(history, vectors, kinds, self._rules.scoring, top)
        out = []
        for gap in found:
            xy = snapshot.projection.apply(gap.centre[None, :])[0]
            out.append(
                {
                    "x": _coordinates(xy)[0],
                    "y": _coordinates(xy)[1],
                    "modality": gap.modality,
                    "size": round(gap.size, 6),
                    "score_ppm": gap.score_ppm,
                    "neighbours": [self._labels.ids[i] for i in gap.neighbours[:5].tolist()],
                }
            )
        return out


# -- HTTP ----------------------------------------------------------------------


async def _answer(work: Awaitable[dict[str, Any]]) -> web.Response:
    """The JSON of ``work``, or its error: bad input 400, busy 429, not ready 503."""
    try:
        return web.json_response(await work)
    except BadInput as error:
        return _error(400, str(error))
    except Busy as error:
        return _error(429, str(error))
    except LookupError as error:
        return _error(503, str(error))


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class ExploreSite:
    """The routes; the explorer is attached once the encoders and the history are loaded."""

    def __init__(self, config: Config, now: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.explorer: Explorer | None = None
        http = config.http
        self._limiter = RateLimiter(http.whatif_per_minute, http.whatif_burst)
        self._now = now
        self._page = resources.files("node.ops").joinpath("explore.html").read_bytes()

    def body_limit(self) -> int:
        """Bytes a what-if request may carry: a picture, a caption, and the form's overhead."""
        limits = self.config.limits
        return limits.image_bytes + limits.text_bytes + 64 * 1024

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/explore", self.page)
        app.router.add_get("/api/points", self.api_points)
        app.router.add_post("/api/whatif", self.api_whatif)
        app.router.add_get("/api/gaps", self.api_gaps)

    def _limited(self, request: web.Request) -> web.Response | None:
        if self._limiter.allow((request.remote or "?").encode(), self._now()):
            return None
        http = self.config.http
        return _error(
            429,
            f"rate limited: at most {http.whatif_per_minute} what-ifs a minute per address "
            f"(http.whatif_per_minute), {http.whatif_burst} at once (http.whatif_burst)",
        )

    async def page(self, _: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8")

    async def api_points(self, _: web.Request) -> web.Response:
        if self.explorer is None or self.explorer.snapshot is None:
            return _error(503, "the explorer is starting: the history is not mapped yet")
        return web.json_response(self.explorer.points())

    async def _form(self, request: web.Request) -> tuple[str | None, bytes | None]:
        """(caption, picture) of a what-if request; a body that cannot be read is bad input.

        aiohttp's readers raise their own errors for a malformed body (a
        multipart without or with a wrong boundary, an overlong part header):
        each is the client's fault, answered 400, never a 500 with a traceback.
        (A coded body never gets here: ``api_whatif`` answers it 415.)
        """
        try:
            caption, picture = await self._read_form(request)
        except BadInput:
            raise
        except (
            ValueError,
            AssertionError,
            RecursionError,
            HttpProcessingError,
            web.RequestPayloadError,
        ) as error:
            kind = request.content_type
            what = "multipart/form-data" if kind == "multipart/form-data" else "request body"
            raise BadInput(f"malformed {what}: {type(error).__name__}") from None
        if caption is not None:
            try:
                caption.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate, escaped in JSON
                raise BadInput("caption is not valid Unicode text") from None
        return caption, picture

    async def _read_form(self, request: web.Request) -> tuple[str | None, bytes | None]:
        """(caption, picture) of a what-if request, read within ``body_limit``."""
        limit = self.body_limit()
        if request.content_length is not None and request.content_length > limit:
            raise BadInput(f"request is too large: {request.content_length} bytes, at most {limit}")
        kind = request.content_type
        if kind == "application/json":
            raw = await request.content.read(limit + 1)
            if len(raw) > limit:
                raise BadInput(f"request is too large: more than {limit} bytes")
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):  # (deep nesting: RecursionError)
                raise BadInput("request body is not JSON") from None
            if not isinstance(body, dict) or set(body) - {"caption"}:
                raise BadInput('expected a JSON object {"caption": "..."}')
            given = body.get("caption")
            if given is not None and not isinstance(given, str):
                raise BadInput("caption must be text")
            return given, None
        if kind == "application/x-www-form-urlencoded":  # a plain HTML form: a caption only
            raw = await request.content.read(limit + 1)
            if len(raw) > limit:
                raise BadInput(f"request is too large: more than {limit} bytes")
            try:
                fields = parse_qs(raw.decode("ascii"), keep_blank_values=True, strict_parsing=False)
            except (UnicodeDecodeError, ValueError):
                raise BadInput("request body is not a URL-encoded form") from None
            if set(fields) - {"caption"}:
                raise BadInput("unknown field: a URL-encoded form carries only a caption")
            values = fields.get("caption", [""])
            return (values[0] or None), None
        if kind != "multipart/form-data":
            raise BadInput(
                f"unsupported content type {kind!r}: send multipart/form-data "
                "(fields caption, picture), a URL-encoded form (caption) "
                'or application/json {"caption": "..."}'
            )
        caption: str | None = None
        picture: bytes | None = None
        total = 0
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise BadInput("nested multipart is not supported")
            data = bytearray()
            while chunk := await part.read_chunk(64 * 1024):
                data += chunk
                total += len(chunk)
                if total > limit:
                    raise BadInput(f"request is too large: more than {limit} bytes")
            if part.name == "caption":
                try:
                    text = bytes(data).decode("utf-8")
                except UnicodeDecodeError:
                    raise BadInput("caption is not UTF-8 text") from None
                caption = text if text else None
            elif part.name == "picture":
                if data or part.filename:  # an empty file input sends an empty part
                    picture = bytes(data) if data else None
                    if not data and part.filename:
                        raise BadInput("picture is empty")
            else:
                raise BadInput(f"unknown field {part.name!r}: expected caption and picture")
        return caption, picture

    async def api_whatif(self, request: web.Request) -> web.Response:
        if self.explorer is None or self.explorer.snapshot is None:
            return _error(503, "the explorer is starting: the history is not mapped yet")
        limited = self._limited(request)
        if limited is not None:
            return limited
        if self.explorer.busy:
            return _error(429, "busy: the node judges one what-if at a time; try again shortly")
        coding = request.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
        if coding not in ("", "identity"):
            return _error(415, f"Content-Encoding {coding!r} is not accepted: send the body as is")
        explorer = self.explorer

        async def answer() -> dict[str, Any]:
            caption, picture = await self._form(request)
            return await explorer.whatif(caption, picture)

        return await _answer(answer())

    async def api_gaps(self, request: web.Request) -> web.Response:
        if self.explorer is None or self.explorer.snapshot is None:
            return _error(503, "the explorer is starting: the history is not mapped yet")
        query = request.query
        try:
            top = int(query.get("top", "10"))
        except ValueError:
            return _error(400, "top must be a whole number")
        if not 1 <= top <= MAX_TOP:
            return _error(400, f"top must be between 1 and {MAX_TOP}")
        modality = query.get("modality") or None
        if modality is not None and modality not in {m.value for m in Modality}:
            return _error(400, f"unknown modality {modality!r}")
        near = query.get("near")
        if near is not None or not self.explorer.gaps_cached(top, modality):
            limited = self._limited(request)
            if limited is not None:
                return limited
        return await _answer(self.explorer.gaps(top, near, modality))
