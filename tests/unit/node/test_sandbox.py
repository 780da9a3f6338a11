"""Decoding in capped worker processes: a bad item costs only itself."""

import asyncio

import pytest

from encoders.errors import (
    DecodingStoppedError,
    MediaTooLargeError,
    UndecodableError,
    UnsupportedModalityError,
)
from encoders.media import MediaLimits
from encoders.modality import Modality
from encoders.weights import DEFAULT_PREPROCESS
from node.pipeline.sandbox import DecoderPool
from tests.media import image_bytes, mp4_bytes, png_header_only, wav_bytes

LIMITS = MediaLimits()


async def decode(pool: DecoderPool, modality: Modality, mime: str, data: bytes):
    return await pool.decode(modality, mime, data, LIMITS, DEFAULT_PREPROCESS)


def test_decodes_and_reports_reasons_from_the_worker():
    async def scenario() -> None:
        process_cpu: list[float] = []
        submit_cpu: list[float] = []
        pool = DecoderPool(
            workers=1,
            timeout_s=30,
            memory_mb=350,
            on_cpu=process_cpu.append,
            on_submit_cpu=submit_cpu.append,
        )
        try:
            image = await decode(pool, Modality.IMAGE, "image/png", image_bytes("RGB"))
            assert image.shape == (3, DEFAULT_PREPROCESS.image_size, DEFAULT_PREPROCESS.image_size)
            # The decoder process's CPU and the caller's cost of handing it the item
            # are reported apart (the node counts them as decode and decode_submit).
            assert len(process_cpu) == 1 and process_cpu[0] > 0.0
            assert len(submit_cpu) == 1 and submit_cpu[0] >= 0.0
            with pytest.raises(MediaTooLargeError):
                await decode(pool, Modality.IMAGE, "image/png", png_header_only(100_000, 100_000))
            with pytest.raises(UndecodableError) as bad:
                await decode(pool, Modality.IMAGE, "image/png", b"\x89PNG nope")
            assert not isinstance(bad.value, DecodingStoppedError)  # a judgement of the bytes
            assert len(submit_cpu) == 3
        finally:
            pool.close()

    asyncio.run(scenario())


async def _a_clip_held(pool: DecoderPool):  # type: ignore[no-untyped-def]
    """The pool's one decoder, and a task whose clip that decoder now holds."""
    slot = await pool._free.get()
    pool._free.put_nowait(slot)
    task = asyncio.create_task(
        decode(pool, Modality.VIDEO, "video/mp4", mp4_bytes(frames=60, size=128))
    )
    while not pool.busy:
        await asyncio.sleep(0.001)
    return slot, task


def _track_new_slots(pool: DecoderPool) -> list:  # type: ignore[type-arg]
    """The decoders the pool starts from now on, in order."""
    created = []
    make_slot = pool._new_slot

    def tracked():  # type: ignore[no-untyped-def]
        created.append(make_slot())
        return created[-1]

    pool._new_slot = tracked  # type: ignore[method-assign]
    return created


def test_a_hung_or_killed_decoder_costs_one_item_and_the_slot_is_replaced():
    async def scenario() -> None:
        failures: list[str] = []
        pool = DecoderPool(workers=1, timeout_s=0.001, memory_mb=350, on_failure=failures.append)
        try:
            # Stopped, not judged: a committee member refuses for one view only.
            with pytest.raises(DecodingStoppedError, match="longer than"):
                await decode(pool, Modality.VIDEO, "video/mp4", mp4_bytes(frames=40))
            pool._timeout_s = 30
            slot, task = await _a_clip_held(pool)
            slot.process.kill()
            # Killed from outside (found from the outside: an OOM kill of a decoder
            # refused a valid clip for good): decoded again on a fresh decoder.
            clip = await task
            assert clip.shape[0] > 0
            assert failures == ["timeout", "crash"]  # poc_decoder_failures_total{kind}
            # Killed twice, holding the same item: stopped.
            created = _track_new_slots(pool)
            slot, task = await _a_clip_held(pool)
            slot.process.kill()
            while not (created and pool.busy):  # the item, on the slot that replaced it
                await asyncio.sleep(0.001)
            created[0].process.kill()
            with pytest.raises(DecodingStoppedError, match="died on this item, twice"):
                await task
            image = await decode(pool, Modality.IMAGE, "image/png", image_bytes("L"))
            assert image.shape[0] == 3
            assert failures == ["timeout", "crash", "crash", "crash"]
        finally:
            pool.close()

    asyncio.run(scenario())


def test_memory_cap_turns_an_allocation_failure_into_undecodable():
    async def scenario() -> None:
        failures: list[str] = []
        pool = DecoderPool(workers=1, timeout_s=60, memory_mb=350, on_failure=failures.append)
        try:
            big = image_bytes("RGB", size=(3900, 3900))
            with pytest.raises(DecodingStoppedError):
                await decode(pool, Modality.IMAGE, "image/png", big)
            small = await decode(pool, Modality.IMAGE, "image/png", image_bytes("RGB"))
            assert small.shape[0] == 3
            assert failures == ["memory"]
        finally:
            pool.close()

    asyncio.run(scenario())


def test_a_spinning_decoder_is_killed_by_its_cpu_cap():
    import signal
    import subprocess
    import sys

    spin = "from node.pipeline.sandbox import _cap_cpu\n_cap_cpu(0.1)\nwhile True:\n    pass\n"
    result = subprocess.run([sys.executable, "-c", spin], timeout=30, check=False)
    assert result.returncode == -signal.SIGXCPU


def test_a_decoder_ended_by_its_cpu_cap_stops_the_item_without_a_second_try():
    """SIGXCPU is the item's own doing (it spun past its CPU cap): decoding it again
    would spend the cap twice, so the item is stopped at once and the slot replaced."""
    import os
    import signal

    async def scenario() -> None:
        failures: list[str] = []
        pool = DecoderPool(workers=1, timeout_s=30, memory_mb=350, on_failure=failures.append)
        created = _track_new_slots(pool)
        try:
            slot, task = await _a_clip_held(pool)
            os.kill(slot.process.pid, signal.SIGXCPU)  # what the kernel sends at the cap
            with pytest.raises(DecodingStoppedError, match="more CPU time"):
                await task
            assert failures == ["crash"]  # one death, no retry on a fresh decoder
            assert len(created) == 1 and created[0].process.is_alive()
            image = await decode(pool, Modality.IMAGE, "image/png", image_bytes("L"))
            assert image.shape[0] == 3
        finally:
            pool.close()

    asyncio.run(scenario())


def test_text_is_decoded_in_the_node_even_while_every_slot_is_busy():
    async def scenario() -> None:
        costs: list[float] = []
        pool = DecoderPool(workers=1, timeout_s=30, memory_mb=350, on_text_cpu=costs.append)
        try:
            # The only slot is taken (a decoding in flight)...
            slot = await pool._free.get()
            # ...and text decodes all the same, with its reasons.
            text = await decode(pool, Modality.TEXT, "text/plain", "un café".encode())
            assert text == "un cafe"  # as the encoders read it (encoders.caption)
            with pytest.raises(UndecodableError, match="UTF-8"):
                await decode(pool, Modality.TEXT, "text/plain", b"\xff\xfe")
            with pytest.raises(MediaTooLargeError):
                await decode(pool, Modality.TEXT, "text/plain", b"a" * (LIMITS.text_bytes + 1))
            with pytest.raises(UndecodableError, match="carries image"):
                await decode(pool, Modality.TEXT, "image/png", image_bytes("RGB"))
            assert len(costs) == 4
            pool._free.put_nowait(slot)
        finally:
            pool.close()

    asyncio.run(scenario())


def test_a_decoder_reuses_its_memory_from_one_item_to_the_next():
    """A speech clip's arrays are a few hundred KiB each; with glibc's defaults every
    item faulted them in as fresh pages (~200 page faults, a fifth more CPU)."""

    def faults(pid: int) -> int:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[7])  # minflt

    async def scenario() -> None:
        pool = DecoderPool(workers=1, timeout_s=30, memory_mb=350)
        clip = wav_bytes("PCM_16", rate=22_050, seconds=3.0)
        try:
            for _ in range(3):  # the first items grow the heap
                await decode(pool, Modality.AUDIO, "audio/wav", clip)
            slot = await pool._free.get()
            pool._free.put_nowait(slot)
            before = faults(slot.process.pid)
            for _ in range(20):
                await decode(pool, Modality.AUDIO, "audio/wav", clip)
            per_item = (faults(slot.process.pid) - before) / 20
            assert per_item < 20, f"{per_item:.0f} page faults per clip"
        finally:
            pool.close()

    asyncio.run(scenario())


class _Touch:
    """A pickle that creates a file when loaded: what a hijacked decoder would send."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_a_hijacked_decoder_cannot_run_code_in_the_node(tmp_path):
    """The node parses a decoder's answer (a JSON header, then raw float32 bytes); a
    pickle from a decoder that hostile media took over is refused, never loaded, and a
    decoder that stops halfway through an answer does not stop the event loop."""
    import pickle
    import threading
    from multiprocessing import Pipe

    import numpy as np

    from node.pipeline import sandbox

    marker = tmp_path / "pwned"

    async def scenario(answers: list[bytes], stall: bool = False):
        ours, theirs = Pipe(duplex=True)
        decoder = object.__new__(sandbox._Decoder)  # no process: this thread plays it
        decoder._attach(ours)
        hang_up = threading.Event()

        def hijacked() -> None:
            if not theirs.poll(10):
                return
            theirs.recv_bytes()
            theirs.recv_bytes()  # the item's bytes
            for answer in answers:
                theirs.send_bytes(answer)
            if stall:
                hang_up.wait(30)

        thread = threading.Thread(target=hijacked)
        thread.start()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        beat = asyncio.create_task(ticker())
        try:
            async with asyncio.timeout(0.5 if stall else 30):
                return await decoder.decode(("request",), b"item", lambda: None)
        finally:
            hang_up.set()
            beat.cancel()
            thread.join()
            decoder._forget_streams()
            ours.close()
            theirs.close()
            assert ticks >= (20 if stall else 0)  # the loop ran on meanwhile

    for answers in (
        [pickle.dumps((True, _Touch(marker)))],  # a pickled reply, weaponised
        [b'{"ok": true, "shape": [2], "cpu": 0.1}', pickle.dumps(_Touch(marker))],
        [b'{"ok": true, "shape": [100000, 100000, 100], "cpu": 0}'],  # 4 TB claimed
        [b'{"ok": true, "shape": [-1], "cpu": 0}'],
        [b"\x80\x05not json"],
        [b"x" * 5000],  # a header past its limit
    ):
        with pytest.raises(sandbox._DecoderDied):
            asyncio.run(scenario(answers))
    assert not marker.exists()
    # A header, then silence: the caller's timeout ends it, the loop never blocked.
    with pytest.raises(TimeoutError):
        asyncio.run(scenario([b'{"ok": true, "shape": [2, 3], "cpu": 0.1}'], stall=True))

    # A well-formed answer: errors by name (an unknown name is undecodable), arrays by bytes.
    with pytest.raises(MediaTooLargeError, match="too big"):
        asyncio.run(
            scenario([b'{"ok": false, "error": "MediaTooLargeError", "message": "too big"}'])
        )
    with pytest.raises(UndecodableError, match="boom"):
        asyncio.run(scenario([b'{"ok": false, "error": "SystemExit", "message": "boom"}']))
    # Every error of the encoders' tree keeps its class, so its reason code.
    with pytest.raises(UnsupportedModalityError, match="no tower"):
        asyncio.run(
            scenario([b'{"ok": false, "error": "UnsupportedModalityError", "message": "no tower"}'])
        )
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    media, cpu = asyncio.run(
        scenario([b'{"ok": true, "shape": [2, 3], "cpu": 0.25}', array.tobytes()])
    )
    assert np.array_equal(media, array) and cpu == 0.25
