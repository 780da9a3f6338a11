"""The gap explorer's HTTP face and its what-if, adversaries first.

The what-if runs through a stand-in ``prepare`` here (known vectors, so that
verdicts can be predicted); the integration test
(tests/integration/test_explorer.py) runs it through the real sandbox and
encoders of a running node.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from consensus.committee import Committee, Member
from encoders.errors import UndecodableError
from encoders.modality import Modality
from node.intake.keys import SigningKey
from node.intake.wire import Submission
from node.ops.cli import main
from node.ops.config import Config, load_config
from node.ops.explore import BadInput, Explorer, ExploreSite, whatif_items
from node.ops.http import http_server
from node.ops.metrics import Metrics
from node.rounds.records import Candidate, Prepared, PreparedItem, RoundRules, score_round
from node.store.sqlite import Store
from node.store.thread import StoreThread
from rewards.curiosity import ScoringRules
from rewards.history import History

DIM = 16
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def config(**http: Any) -> Config:
    overrides = {"http.explore": True, "http.explore_sample": 50}
    overrides.update({f"http.{key}": value for key, value in http.items()})
    return load_config(overrides=overrides)


class StandIn:
    """``Preparer.prepare`` with known vectors: the caption's text picks its vector."""

    def __init__(self, vectors: dict[bytes, np.ndarray]) -> None:
        self.vectors = vectors
        self.calls = 0

    async def __call__(self, submission: Submission, epoch: int) -> Prepared:
        self.calls += 1
        items = []
        for item in submission.items:
            if item.data not in self.vectors:
                raise UndecodableError("the stand-in cannot decode this")
            vector = self.vectors[item.data].astype("<f2").tobytes()
            items.append(PreparedItem(item.modality, vector, False, 1_000_000, item.sha256))
        return Prepared(epoch, tuple(items), None, False)


RULES = RoundRules(ScoringRules(k=4, qualify_ratio=1.0, duplicate_radius={"text": 0.001}), 1000, 3)


def history_of(count: int, seed: int = 0) -> History:
    rng = np.random.default_rng(seed)
    history = History(DIM)
    history.add(["text"] * count, unit(rng.normal(size=(count, DIM))))
    return history


class Running:
    def __init__(self, port: int, explorer: Explorer, store: StoreThread) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.explorer = explorer
        self.store = store


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    rng = np.random.default_rng(7)
    vectors = {b"known caption": unit(rng.normal(size=DIM)), PNG: unit(rng.normal(size=DIM))}
    async with NodeLike(tmp_path, config(), StandIn(vectors)) as running:
        yield running


class NodeLike:
    """The pieces of a node the explorer reads: a store, a history, the HTTP server."""

    def __init__(self, tmp_path: Path, cfg: Config, prepare: StandIn, size: int = 30) -> None:
        self.tmp_path, self.cfg, self.prepare, self.size = tmp_path, cfg, prepare, size

    async def __aenter__(self) -> Running:
        self.store = StoreThread(Store(self.tmp_path / "node.sqlite3"))
        key = SigningKey.generate()
        committee = Committee(0, 10, 60, (Member("self", key.public_key, 1),))
        self.site = ExploreSite(self.cfg)
        explorer = Explorer(
            self.cfg,
            history_of(self.size),
            asyncio.Lock(),
            RULES,
            self.prepare,
            self.store,
            committee,
        )
        await explorer.load()
        await explorer.refresh()
        self.site.explorer = explorer
        self.server = http_server(
            "127.0.0.1", 0, Metrics(CollectorRegistry()), lambda: {}, self.site
        )
        port = await self.server.__aenter__()
        return Running(port, explorer, self.store)

    async def __aexit__(self, *exc: object) -> None:
        await self.server.__aexit__(None, None, None)
        self.store.close()


async def post(url: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(url, **kwargs) as response:
        return response.status, await response.json()


async def post_raw(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.post(url, json={}) as response:
        return response.status, await response.read()


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


def _raw(body: bytes, content_type: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """A request body sent as is, under these headers."""
    return {"data": body, "headers": {"Content-Type": content_type, **(headers or {})}}


def form(**fields: tuple[bytes, str] | str) -> aiohttp.FormData:
    data = aiohttp.FormData()
    for name, value in fields.items():
        if isinstance(value, tuple):
            data.add_field(
                name, value[0], filename=value[1], content_type="application/octet-stream"
            )
        else:
            data.add_field(name, value)
    return data


# -- adversaries -------------------------------------------------------------


def test_whatif_items_refuses_what_a_submission_could_not_carry() -> None:
    with pytest.raises(BadInput, match="nothing to judge"):
        whatif_items(None, None, 100, 100)
    with pytest.raises(BadInput, match="caption is empty"):
        whatif_items("   ", None, 100, 100)
    with pytest.raises(
        BadInput, match=r"caption is too large: 101 bytes, limits.text_bytes is 100"
    ):
        whatif_items("x" * 101, None, 100, 100)
    with pytest.raises(BadInput, match="picture is empty"):
        whatif_items(None, b"", 100, 100)
    with pytest.raises(BadInput, match=r"picture is too large: .*limits.image_bytes is 10"):
        whatif_items(None, PNG, 100, 10)
    with pytest.raises(BadInput, match="not an image"):
        whatif_items(None, b"GIF89a....", 100, 100)
    items = whatif_items("a caption", b"\xff\xd8\xff\xe0rest", 100, 100)
    assert [(i.modality, i.mime) for i in items] == [
        (Modality.TEXT, "text/plain"),
        (Modality.IMAGE, "image/jpeg"),
    ]
    assert items[0].sha256 == hashlib.sha256(b"a caption").digest()


async def test_explorer_is_404_when_off() -> None:
    async with http_server("127.0.0.1", 0, Metrics(CollectorRegistry()), lambda: {}) as port:
        for path in ("/explore", "/api/points", "/api/gaps"):
            status, _ = await get(f"http://127.0.0.1:{port}{path}")
            assert status == 404, path
        status, _ = await post_raw(f"http://127.0.0.1:{port}/api/whatif")
        assert status in (404, 405)


async def test_explorer_is_503_until_the_history_is_mapped() -> None:
    site = ExploreSite(config())
    async with http_server("127.0.0.1", 0, Metrics(CollectorRegistry()), lambda: {}, site) as port:
        status, body = await get(f"http://127.0.0.1:{port}/api/points")
        assert status == 503 and "starting" in body["error"]
        status, body = await post(f"http://127.0.0.1:{port}/api/whatif", json={"caption": "x"})
        assert status == 503
        status, page = await get(f"http://127.0.0.1:{port}/explore")
        assert status == 200 and 'id="drawn"' in page


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"data": b"caption=hello", "headers": {"Content-Type": "text/plain"}}, "content type"),
        ({"json": {"caption": 3}}, "caption must be text"),
        ({"json": {"caption": "x", "extra": 1}}, "expected a JSON object"),
        ({"json": {}}, "nothing to judge"),
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, "not JSON"),
        ({"data": form(caption="")}, "nothing to judge"),
        ({"data": form(picture=(b"", "empty.png"))}, "picture is empty"),
        ({"data": form(picture=(b"plain text", "a.png"))}, "not an image"),
        ({"data": form(caption=b"\xff\xfe".decode("latin-1"), other="x")}, "unknown field"),
        ({"json": {"caption": "x" * 70_000}}, "caption is too large"),
        ({"json": {"caption": "not known to the stand-in"}}, "undecodable"),
        # Found from the outside: each of these was a 500 with a traceback.
        (_raw(b'{"caption": "\\ud800"}', "application/json"), "not valid Unicode"),
        (_raw(b"[" * 100_000, "application/json"), "not JSON"),
        (_raw(b'{"caption":' * 50_000, "application/json"), "not JSON"),
        (_raw(b"caption", "multipart/form-data"), "malformed multipart"),
        (_raw(b"caption", 'multipart/form-data; boundary=""'), "malformed multipart"),
        (_raw(b"garbage, no boundary in sight", "multipart/form-data; boundary=b"), "malformed"),
        (
            _raw(
                b"--b\r\nX-Long: " + b"a" * 100_000 + b"\r\n\r\nx\r\n--b--\r\n",
                "multipart/form-data; boundary=b",
            ),
            "malformed multipart",
        ),
    ],
)
async def test_bad_whatifs_get_a_400_naming_the_problem(
    running: Running, kwargs: dict[str, Any], expected: str
) -> None:
    status, body = await post(f"{running.url}/api/whatif", **kwargs)
    assert status == 400, body
    assert expected in body["error"]
    # ...and the node still answers.
    status, body = await post(f"{running.url}/api/whatif", json={"caption": "known caption"})
    assert status == 200, body


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "GZIP "])
async def test_a_coded_body_is_refused_and_never_inflated(
    running: Running, coding: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found from the outside: aiohttp inflated request bodies on the event loop as
    they arrived, for every endpoint; a 2 MB gzip body of zeros (2 GiB inflated)
    held the loop half a second, the consensus and the bus with it."""
    import gzip

    from aiohttp import http_parser

    inflaters: list[str] = []
    made = http_parser.DeflateBuffer.__init__

    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        inflaters.append(coding)
        made(self, *args, **kwargs)

    monkeypatch.setattr(http_parser.DeflateBuffer, "__init__", spy)
    body = gzip.compress(b'{"caption": "known caption"}')
    headers = {"Content-Encoding": coding}
    status, answer = await post(
        f"{running.url}/api/whatif", **_raw(body, "application/json", headers)
    )
    assert status == 415 and "Content-Encoding" in answer["error"], answer
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{running.url}/healthz", **_raw(body, "application/json", headers)) as got,
    ):
        assert got.status == 405  # read by no one: inflated by no one either
    assert inflaters == []
    status, answer = await post(f"{running.url}/api/whatif", json={"caption": "known caption"})
    assert status == 200, answer


async def test_a_picture_too_large_for_the_node_is_refused_before_it_is_read(
    running: Running,
) -> None:
    limit = running.explorer._config.limits.image_bytes
    huge = PNG + b"\x00" * limit
    status, body = await post(f"{running.url}/api/whatif", data=form(picture=(huge, "big.png")))
    assert status == 400 and "too large" in body["error"]


async def test_whatifs_are_rate_limited_per_address(tmp_path: Path) -> None:
    stand_in = StandIn({b"known caption": unit(np.ones(DIM))})
    cfg = config(whatif_per_minute=1, whatif_burst=2)
    async with NodeLike(tmp_path, cfg, stand_in) as running:
        url = f"{running.url}/api/whatif"
        assert (await post(url, json={"caption": "known caption"}))[0] == 200
        assert (await post(url, json={"caption": "known caption"}))[0] == 200
        status, body = await post(url, json={"caption": "known caption"})
        assert status == 429
        assert "http.whatif_per_minute" in body["error"] and "at most 1" in body["error"]
        # Searching near a caption encodes it: the same limit.
        status, _ = await get(f"{running.url}/api/gaps?near=known%20caption")
        assert status == 429
        # So are gaps not yet computed for this history; computed ones are free, like the map.
        assert (await get(f"{running.url}/api/gaps?top=3"))[0] == 429
        await running.explorer.gaps(3, None, None)
        assert (await get(f"{running.url}/api/gaps?top=3"))[0] == 200
        assert (await get(f"{running.url}/api/points"))[0] == 200
        assert stand_in.calls == 2


# -- what the explorer says --------------------------------------------------


async def test_points_are_the_bounded_sample_with_labels_and_no_bytes(running: Running) -> None:
    status, body = await get(f"{running.url}/api/points")
    assert status == 200
    assert body["history_size"] == 30 and body["count"] == 30 and body["sample_size"] == 30
    assert {p["modality"] for p in body["points"]} == {"text"}
    assert all(p["round"] is None and p["id"].startswith("genesis/") for p in body["points"])
    assert set(body["points"][0]) == {"id", "modality", "round", "x", "y", "paid"}
    again = await get(f"{running.url}/api/points")
    assert again[1] == body  # same history, same map


async def test_the_map_is_bounded_by_the_sample_and_shows_paid_items(tmp_path: Path) -> None:
    cfg = config(explore_sample=10, explore_paid_rounds=2)
    async with NodeLike(tmp_path, cfg, StandIn({}), size=40) as running:
        explorer = running.explorer
        body = explorer.points()
        assert body["count"] == 10 and body["sample_size"] == 10
        # A round commits two items of one paid submission and one of an unpaid one.
        history = explorer._history
        rng = np.random.default_rng(1)
        history.add(["image", "text", "text"], unit(rng.normal(size=(3, DIM))))
        paid, unpaid = b"\x01" * 32, b"\x02" * 32
        explorer.committed(5, [(paid, 0), (paid, 1), (unpaid, 0)], {paid})
        await explorer.refresh()
        body = explorer.points()
        shown = {p["id"]: p for p in body["points"]}
        assert shown[f"{paid[:6].hex()}/0"]["paid"] and shown[f"{paid[:6].hex()}/1"]["paid"]
        assert shown[f"{paid[:6].hex()}/0"]["round"] == 5
        assert sum(p["paid"] for p in body["points"]) == 2
        assert body["count"] <= 10 + 2
        # Two rounds later the highlight is gone.
        explorer.committed(7, [], set())
        await explorer.refresh()
        assert not any(p["paid"] for p in explorer.points()["points"])


async def test_whatif_gives_the_round_scorers_verdict_and_keeps_nothing(running: Running) -> None:
    explorer = running.explorer
    history = explorer._history
    size = len(history)
    status, body = await post(f"{running.url}/api/whatif", json={"caption": "known caption"})
    assert status == 200, body
    assert len(history) == size  # nothing joined H
    assert await running.store.call(lambda db: db.history_labels()) == []
    # The verdict a round would give the same prepared submission.
    data = b"known caption"
    prepared = await explorer._prepare(
        Submission(b"\x00" * 32, 0, 0, whatif_items("known caption", None, 100, 100), b"", b""), 0
    )
    record = score_round([Candidate(b"\x07" * 32, b"\x08" * 32, prepared)], history, RULES, set())[
        0
    ]
    assert body["status"] == record.status
    assert body["score_ppm"] == record.score
    assert body["scores_ppm"] == list(record.scores_ppm or [])
    assert body["would_qualify"] == (record.score > 0)
    item = body["items"][0]
    assert item["score_ppm"] == record.scores_ppm[0]  # type: ignore[index]
    assert item["qualified"] == (item["distance_to_centre"] <= item["qualify_limit"])
    assert len(item["neighbours"]) == 4
    distances = [n["distance"] for n in item["neighbours"]]
    assert distances == sorted(distances)
    # Once the same item is in the history, the what-if calls it a duplicate.
    history.add(["text"], np.frombuffer(prepared.items[0].vector, "<f2")[None, :])
    explorer.committed(1, [(hashlib.sha256(data).digest(), 0)], set())
    status, body = await post(f"{running.url}/api/whatif", json={"caption": "known caption"})
    assert status == 200
    assert body["items"][0]["duplicate"] is True
    assert body["would_qualify"] is False and body["status"] == "rejected"


async def test_whatif_of_a_picture_and_a_caption_is_judged_as_a_pair(running: Running) -> None:
    status, body = await post(
        f"{running.url}/api/whatif", data=form(caption="known caption", picture=(PNG, "p.png"))
    )
    assert status == 200, body
    assert [item["modality"] for item in body["items"]] == ["text", "image"]
    assert json.dumps(body).find("known caption") == -1  # the answer never echoes the input


async def test_gaps_are_largest_first_and_filtered(running: Running) -> None:
    status, body = await get(f"{running.url}/api/gaps?top=3")
    assert status == 200
    sizes = [gap["size"] for gap in body["gaps"]]
    assert 0 < len(sizes) <= 3 and sizes == sorted(sizes, reverse=True)
    assert body["k"] == 4
    status, body = await get(f"{running.url}/api/gaps?top=2&near=known%20caption")
    assert status == 200 and len(body["gaps"]) <= 2
    status, body = await get(f"{running.url}/api/gaps?modality=image")
    assert status == 200 and body["gaps"] == []
    for query, expected in (
        ("top=0", "between"),
        ("top=x", "whole"),
        ("modality=smell", "unknown"),
    ):
        status, body = await get(f"{running.url}/api/gaps?{query}")
        assert status == 400 and expected in body["error"]


async def test_poc_node_gaps_prints_the_largest_gaps(
    running: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    status = await asyncio.to_thread(main, ["gaps", "--top", "2", "--url", running.url])
    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    assert "history 30 items" in lines[0] and "k = 4" in lines[0]
    assert lines[1].split() == ["size", "modality", "x", "y", "nearest"]
    sizes = [float(line.split()[0]) for line in lines[2:]]
    assert 0 < len(sizes) <= 2 and sizes == sorted(sizes, reverse=True)


async def test_poc_node_gaps_names_a_node_without_explorer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with http_server("127.0.0.1", 0, Metrics(CollectorRegistry()), lambda: {}) as port:
        url = f"http://127.0.0.1:{port}"
        status = await asyncio.to_thread(main, ["gaps", "--url", url])
    assert status == 1
    assert "set http.explore: true" in capsys.readouterr().err


class Blocking(StandIn):
    """Holds every prepare until released."""

    def __init__(self, vectors: dict[bytes, np.ndarray]) -> None:
        super().__init__(vectors)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, submission: Submission, epoch: int) -> Prepared:
        self.entered.set()
        await self.release.wait()
        return await super().__call__(submission, epoch)


async def test_whatifs_never_queue_up_in_the_node(tmp_path: Path) -> None:
    stand_in = Blocking({b"known caption": unit(np.ones(DIM))})
    async with NodeLike(tmp_path, config(), stand_in) as running:
        url = f"{running.url}/api/whatif"
        first = asyncio.create_task(post(url, json={"caption": "known caption"}))
        await asyncio.wait_for(stand_in.entered.wait(), 10)
        status, body = await post(url, json={"caption": "known caption"})
        assert status == 429 and "one what-if at a time" in body["error"]
        stand_in.release.set()
        assert (await first)[0] == 200
        assert (await post(url, json={"caption": "known caption"}))[0] == 200
