"""The history a node loads at start: genesis, then the store's items in chunks."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from encoders.weights import write_genesis
from node.rounds.history import load_history
from node.rounds.records import from_float16, to_float16
from node.store.sqlite import CommittedRound, Finalization, State, Store
from rewards.history import History

DIM = 16
MODALITIES = ("text", "image", "audio", "video")


def test_a_history_loaded_in_chunks_is_the_history_loaded_at_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    genesis = tmp_path / "genesis.safetensors"
    genesis_vectors = rng.standard_normal((12, DIM))
    junk = [bool(i % 4 == 0) for i in range(12)]
    write_genesis(genesis, [MODALITIES[i % 4] for i in range(12)], genesis_vectors, junk)
    shard = SimpleNamespace(dim=DIM, genesis=genesis)

    store = Store(tmp_path / "s.db")
    labels = [MODALITIES[int(i)] for i in rng.integers(0, 4, 230)]
    vectors = rng.standard_normal((230, DIM))
    for number, start in enumerate(range(0, 230, 23)):
        outcomes = [
            Finalization(
                i.to_bytes(32, "big"),
                b"s" * 32,
                State.FINAL,
                None,
                ((0, labels[i], to_float16(vectors[i])),),
                (),
                0,
            )
            for i in range(start, start + 23)
        ]
        store.commit_round(
            CommittedRound(number, b"v" * 32, b"b" * 32, b"c", b"s"), outcomes, [], 1
        )

    chunked = load_history(shard, store.history_chunks(DIM, chunk_rows=17))

    # what the node built before: every item in memory, stacked, added at once
    at_once = History(DIM)
    half = genesis_vectors.astype(np.float16)
    keep = ~np.asarray(junk)
    at_once.add([MODALITIES[i % 4] for i in range(12) if not junk[i]], half[keep])
    at_once.add_junk([MODALITIES[i % 4] for i in range(12) if junk[i]], half[~keep])
    items = store.history_items()
    at_once.add([m for m, _ in items], np.stack([from_float16(v) for _, v in items]))

    ids = np.arange(len(at_once))
    assert len(chunked) == len(at_once) == 239
    assert chunked.modalities() == at_once.modalities()
    assert chunked.modality_of(ids) == at_once.modality_of(ids)
    assert (chunked.vectors(ids) == at_once.vectors(ids)).all()
    assert chunked.junk is not None and at_once.junk is not None
    assert len(chunked.junk) == len(at_once.junk) == 3
    queries = rng.standard_normal((20, DIM))
    assert (chunked.neighbours(queries, 8) == at_once.neighbours(queries, 8)).all()
    assert (chunked.junk.neighbours(queries, 2) == at_once.junk.neighbours(queries, 2)).all()


async def test_the_node_loads_its_history_on_the_store_thread(tmp_path: Path) -> None:
    """As ``Node.run`` does: the chunks are read and added on the store's own thread."""
    from node.store.thread import StoreThread

    store = StoreThread(Store(tmp_path / "s.db"))
    vector = to_float16(np.ones(DIM) / 4)
    outcome = Finalization(b"a" * 32, b"s" * 32, State.FINAL, None, ((0, "text", vector),), (), 0)
    await store.commit_round(CommittedRound(0, b"v" * 32, b"b" * 32, b"c", b"s"), [outcome], [], 1)
    shard = SimpleNamespace(dim=DIM, genesis=None)
    history = await store.call(lambda db: load_history(shard, db.history_chunks(shard.dim)))
    store.close()
    assert len(history) == 1 and (history.vectors(np.array([0])) == 0.25).all()


def test_a_restart_keeps_the_own_embeddings_of_pair_items_beside_the_history(
    tmp_path: Path,
) -> None:
    """The near-duplicate check reads pair items' own embeddings (``History.own``): a
    node that lost them at a restart would pay copies of paired data again."""
    store = Store(tmp_path / "s.db")
    rng = np.random.default_rng(3)
    fused, own = rng.standard_normal((2, 2, DIM))
    outcome = Finalization(
        b"p" * 32,
        b"s" * 32,
        State.FINAL,
        None,
        tuple((i, m, to_float16(fused[i])) for i, m in enumerate(("text", "image"))),
        (),
        0,
        tuple((i, m, to_float16(own[i])) for i, m in enumerate(("text", "image"))),
    )
    store.commit_round(CommittedRound(4, b"v" * 32, b"b" * 32, b"c", b"s"), [outcome], [], 1)
    shard = SimpleNamespace(dim=DIM, genesis=None)
    history = load_history(
        shard,
        store.history_chunks(DIM),
        own_chunks=store.history_chunks(DIM, table="own_vectors"),
    )
    assert len(history) == 2 and history.own is not None and len(history.own) == 2
    assert (history.own.vectors(np.array([1])) == own[1].astype(np.float16)).all()
    assert history.own.modality_of(np.array([0, 1])) == ["text", "image"]
    assert [row[:4] for row in store.history_rows("own_vectors")] == [
        (4, b"p" * 32, 0, "text"),
        (4, b"p" * 32, 1, "image"),
    ]
    assert list(store.history_chunks(DIM, before_round=4, table="own_vectors")) == []  # audit
    with pytest.raises(ValueError, match="no history table"):
        store.history_rows("ledger")


def test_the_configured_index_answers_as_faiss_does_torch_on_the_cpu_included(tmp_path: Path):
    """``scoring.index: torch`` is the GPU's index, tested here on the CPU through the node's path."""
    import torch

    from node.errors import NodeError
    from node.rounds.history import history_index
    from rewards.history import HistoryIndex
    from rewards.history_torch import TorchHistoryIndex

    assert history_index("cpu", "auto") is HistoryIndex
    torch_cpu = history_index("cpu", "torch")
    assert isinstance(torch_cpu(DIM), TorchHistoryIndex)
    if not torch.cuda.is_available():
        with pytest.raises(NodeError, match="no CUDA device"):
            history_index("cuda", "auto")

    rng = np.random.default_rng(3)
    labels = [MODALITIES[int(i)] for i in rng.integers(0, 4, 500)]
    rows = rng.standard_normal((500, DIM))
    rows[100:110] = rows[0]  # exact ties: broken by id on both indexes
    chunks = [(labels[i : i + 64], rows[i : i + 64].astype(np.float16)) for i in range(0, 500, 64)]
    shard = SimpleNamespace(dim=DIM, genesis=None)
    faiss_history = load_history(shard, chunks)
    torch_history = load_history(shard, chunks, torch_cpu)
    queries = np.concatenate([rng.standard_normal((40, DIM)), rows[:1]])
    # The same candidates (float32 near-ties may come in another order: the gap scores
    # re-rank them exactly in float64, rewards.curiosity).
    by_faiss = np.sort(faiss_history.neighbours(queries, 16), axis=1)
    by_torch = np.sort(torch_history.neighbours(queries, 16), axis=1)
    assert (by_faiss == by_torch).all()


def test_a_faiss_index_on_a_gpu_is_refused_by_the_config():
    from node.errors import ConfigError
    from node.ops.config import load_config

    with pytest.raises(ConfigError, match="faiss runs on the CPU only"):
        load_config(None, {"scoring.device": "cuda", "scoring.index": "faiss"})
    assert load_config(None, {"scoring.device": "cuda"}).scoring.index == "auto"
