"""Media decoding in separate, capped worker processes (text, bounded UTF-8, in the node).

Each slot is one decoder process with an address-space cap and, for every
item, a CPU-time cap (the kernel kills a decoder that spins). An item whose
decoding crashes its process, exceeds a cap, or does not finish within the
wall-clock limit, costs only that slot's process; the item is rejected as
``undecodable`` and the slot is replaced. Decoders never share a process with
torch, the store or the event loop.

The node talks to a decoder over one pipe, an asyncio stream on the event
loop: the item goes out as one pickled message, and the answer, a JSON
header and the array's raw float32 bytes, is read without blocking the loop
and checked field by field. The node never unpickles what a decoder sends
(a decoder is where hostile media would take over a process), and a decoder
that stalls mid-answer is stopped by the timeout. A ``ProcessPoolExecutor``
per slot cost two more threads of the node per item (its queue feeder and
its manager) and as much again of the node's CPU as decoding a picture
(bench/bench_e2e.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import multiprocessing
import os
import pickle
import resource
import signal
import socket
import struct
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import numpy.typing as npt

from encoders.errors import DecodingStoppedError, EncoderError, UndecodableError
from encoders.media import DecodedMedia, MediaLimits, PreprocessSpec, decode_media
from encoders.modality import Modality

log = logging.getLogger("poc.sandbox")


_HEAP_MMAP_THRESHOLD = 4 << 20
"""A decoder's allocations up to this size reuse its heap; larger ones get their own pages."""
_HEAP_TRIM_THRESHOLD = 16 << 20
"""Free memory a decoder's heap keeps between items; the rest goes back at once."""


def _limit_worker(memory_bytes: int) -> None:
    """Runs first in every decoder process: one thread per library, capped memory, a kept heap.

    The worker also ends itself when its parent (the forkserver) goes away.
    """
    from node.ops.orphan_guard import watch_parent
    from node.ops.threads import name_thread, reuse_heap

    watch_parent()
    name_thread("poc-decoder")
    # A clip's arrays (a few hundred KiB each) would otherwise be fresh pages for
    # every item: ~200 page faults and a fifth more CPU per speech clip.
    reuse_heap(_HEAP_MMAP_THRESHOLD, _HEAP_TRIM_THRESHOLD)
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _cap_cpu(seconds: float) -> float:
    """Let this item use at most ``seconds`` more CPU time; past it the kernel kills us.

    Returns the CPU time this process had spent before.
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    spent = usage.ru_utime + usage.ru_stime
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = int(spent + seconds) + 1
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    return spent


_OUT_OF_MEMORY = "decoding needed more memory than the decoder is allowed"


def _decode(
    modality: Modality,
    mime: str,
    data: bytes,
    limits: MediaLimits,
    spec: PreprocessSpec,
    cpu_seconds: float,
) -> tuple[DecodedMedia, float]:
    """The decoded item, and the CPU time this process spent decoding it."""
    spent = _cap_cpu(cpu_seconds)
    try:
        media = decode_media(modality, mime, data, limits, spec)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return media, usage.ru_utime + usage.ru_stime - spent
    except EncoderError as error:
        if _caused_by_memory(error):  # a decoder that wrapped the allocation failure
            raise DecodingStoppedError(_OUT_OF_MEMORY) from None
        raise
    except MemoryError:
        raise DecodingStoppedError(_OUT_OF_MEMORY) from None
    except Exception as error:  # a decoder bug must cost this item only
        raise UndecodableError(f"{type(error).__name__}: {error}") from None


def _serve(requests: Connection, memory_bytes: int) -> None:
    """A decoder process: decode the items the node sends, one at a time, until it hangs up.

    Each answer is a JSON header, then (for a decoded item) the array's raw
    float32 bytes: the node never unpickles what a decoder sends, because a
    decoder is where hostile media would take over a process.
    """
    _limit_worker(memory_bytes)
    while True:
        try:
            request = requests.recv_bytes()
            data = requests.recv_bytes()  # the item's bytes, apart: never copied into a pickle
        except (EOFError, OSError):
            return
        try:
            modality, mime, limits, spec, cpu_seconds = pickle.loads(request)
            media, cpu = _decode(modality, mime, data, limits, spec, cpu_seconds)
            array = np.ascontiguousarray(media, dtype=np.float32)
            header = {"ok": True, "shape": list(array.shape), "cpu": cpu}
        except Exception as error:  # every item gets an answer
            header = {"ok": False, "error": type(error).__name__, "message": str(error)[:1000]}
            array = None
        requests.send_bytes(json.dumps(header).encode())
        if array is not None:
            requests.send_bytes(array.data.cast("B"))


class _DecoderDied(Exception):
    """The decoder process ended while it held an item, or answered out of protocol."""


class _RetryOnce(Exception):
    """The decoder died holding the item, not of the item's CPU cap: decode it again."""


_REAP_S = 0.5
"""How long a dead decoder is waited for, to read how it ended."""


_HEADER_BYTES = 4096
"""The most a decoder's answer header may take."""
_ANSWER_BYTES = 256 * 1024 * 1024
"""The most a decoded item may take (a float32 array; the largest is a clip, 393 KiB)."""


def _error_tree(root: type[EncoderError]) -> list[type[EncoderError]]:
    return [root, *(kind for child in root.__subclasses__() for kind in _error_tree(child))]


_ERRORS: dict[str, type[EncoderError]] = {kind.__name__: kind for kind in _error_tree(EncoderError)}
"""The errors a decoder may report by name: the encoders' own tree, each with its
reason code (any other name is ``undecodable``; nothing else is ever instantiated)."""


def _answer(header: bytes) -> tuple[bool, Any, tuple[int, ...], float]:
    """A decoder's answer header, checked field by field: (ok, error, shape, cpu)."""
    try:
        fields = json.loads(header)
        if fields.get("ok") is True:
            shape = tuple(fields["shape"])
            cpu = fields["cpu"]
            if (
                len(shape) <= 4
                and all(type(n) is int and n > 0 for n in shape)
                and type(cpu) in (int, float)
                and 4 * math.prod(shape) <= _ANSWER_BYTES
            ):
                return True, None, shape, float(cpu)
        elif fields.get("ok") is False:
            kind = _ERRORS.get(str(fields["error"]), UndecodableError)
            return False, kind(str(fields["message"])[:1000]), (), 0.0
    except (ValueError, TypeError, KeyError, AttributeError):
        pass
    raise _DecoderDied()


def _frame(size: int) -> bytes:
    """``multiprocessing.Connection``'s length prefix, which the decoder reads and writes."""
    return struct.pack("!i", size) if size <= 0x7FFFFFFF else struct.pack("!iQ", -1, size)


async def _message(reader: asyncio.StreamReader, limit: int) -> bytes:
    """One message of at most ``limit`` bytes from the decoder, read without blocking."""
    (size,) = struct.unpack("!i", await reader.readexactly(4))
    if size == -1:
        (size,) = struct.unpack("!Q", await reader.readexactly(8))
    if not 0 <= size <= limit:
        raise _DecoderDied()
    return await reader.readexactly(size)


class _Decoder:
    """One sandboxed decoder process and the pipe the node talks to it through.

    The node's end is an asyncio stream: writing an 8 MiB item and reading an
    answer never block the event loop, so a decoder that stalls halfway
    through a message is stopped by the pool's timeout like any other.
    """

    def __init__(self, context: multiprocessing.context.ForkServerContext, memory_bytes: int):
        ours, theirs = context.Pipe(duplex=True)
        self.process = context.Process(target=_serve, args=(theirs, memory_bytes), daemon=True)
        self.process.start()
        theirs.close()
        self._attach(ours)

    def _attach(self, pipe: Connection) -> None:
        """Talk to the decoder at the other end of ``pipe``."""
        self._pipe = pipe
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._end: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def decode(
        self, request: tuple[Any, ...], data: bytes, on_sent: Callable[[], None]
    ) -> tuple[npt.NDArray[np.float32], float]:
        """The decoded item and the decoder's CPU time for it; raises what decoding
        raised, or :class:`_DecoderDied`. ``request`` is pickled; ``data`` (up to
        8 MiB) goes out as it is. ``on_sent`` runs once both are handed to the stream."""
        try:
            reader, writer = await self._connected()
            payload = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
            writer.write(_frame(len(payload)) + payload + _frame(len(data)))
            writer.write(data)  # sent as far as the socket takes it; only the rest is copied
            on_sent()
            await writer.drain()
            ok, error, shape, cpu = _answer(await _message(reader, _HEADER_BYTES))
            if not ok:
                raise error
            data = await _message(reader, 4 * math.prod(shape))
        except (OSError, EOFError, asyncio.IncompleteReadError, struct.error):
            raise _DecoderDied() from None
        if len(data) != 4 * math.prod(shape):
            raise _DecoderDied()
        return np.frombuffer(data, dtype=np.float32).reshape(shape), cpu  # read-only

    async def _connected(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The streams on the running loop (made again under a new loop: tools and
        tests may run one pool under several ``asyncio.run``)."""
        loop = asyncio.get_running_loop()
        if self._streams is None or self._loop is not loop:
            self._forget_streams()
            self._end = socket.socket(fileno=os.dup(self._pipe.fileno()))
            self._streams = await asyncio.open_unix_connection(sock=self._end)
            self._loop = loop
        return self._streams

    def _forget_streams(self) -> None:
        if self._streams is not None and self._loop is not None and not self._loop.is_closed():
            self._streams[1].close()
        elif self._end is not None:
            self._end.close()  # its loop is gone: close the descriptor itself
        self._streams = self._end = self._loop = None

    def kill(self) -> None:
        self.process.kill()
        self._forget_streams()
        self._pipe.close()


def _caused_by_memory(error: BaseException) -> bool:
    cause = error.__cause__ or error.__context__
    while cause is not None:
        if isinstance(cause, MemoryError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def forkserver() -> multiprocessing.context.ForkServerContext:
    """The one forkserver every helper process of the node starts from.

    Its preloads run once, in order, before any worker is forked: numerical
    libraries single-threaded first (``node.pipeline.single_threaded``), then
    the parent watch and the decoders. Every pool must ask for it here: the
    first one to start a process starts the server, and a server started
    without these preloads gives decoders a numpy with a thread (and its
    buffers) per core.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        ["node.pipeline.single_threaded", "node.ops.orphan_guard", "encoders.media"]
    )
    return context


class DecoderPool:
    """``workers`` sandboxed decoder processes, used one item at a time each."""

    def __init__(
        self,
        workers: int,
        timeout_s: float,
        memory_mb: int,
        cpu_seconds: float | None = None,
        on_cpu: Callable[[float], None] | None = None,
        on_text_cpu: Callable[[float], None] | None = None,
        on_failure: Callable[[str], None] | None = None,
        on_submit_cpu: Callable[[float], None] | None = None,
    ) -> None:
        """``on_cpu`` hears the CPU time each item cost its decoder process; ``on_text_cpu``
        what each text cost the node; ``on_failure`` each decoder stopped (``timeout``),
        dead (``crash``) or out of memory (``memory``); ``on_submit_cpu`` what handing
        an item to its decoder process cost the calling thread."""
        self._on_cpu = on_cpu
        self._on_submit_cpu = on_submit_cpu
        self._on_failure = on_failure
        self._on_text_cpu = on_text_cpu
        self._timeout_s = timeout_s
        self._cpu_seconds = cpu_seconds if cpu_seconds is not None else timeout_s
        self._memory_bytes = memory_mb * 1024 * 1024
        self._context = forkserver()
        self._free: asyncio.Queue[_Decoder] = asyncio.Queue()
        for _ in range(workers):
            self._free.put_nowait(self._new_slot())
        self._all = workers

    def _new_slot(self) -> _Decoder:
        return _Decoder(self._context, self._memory_bytes)

    @property
    def busy(self) -> int:
        return self._all - self._free.qsize()

    async def decode(
        self,
        modality: Modality,
        mime: str,
        data: bytes,
        limits: MediaLimits,
        spec: PreprocessSpec,
    ) -> DecodedMedia:
        """Decode one item; raises an :class:`EncoderError` subclass for a bad item.

        Text is decoded here, in the node's process: strict UTF-8 of at most
        ``limits.text_bytes`` is bounded work with no parser behind it, and a
        round trip to a sandbox would cost more than the decoding.
        """
        if modality is Modality.TEXT:
            started = time.thread_time()
            try:
                return decode_media(modality, mime, data, limits, spec)
            finally:
                if self._on_text_cpu is not None:
                    self._on_text_cpu(time.thread_time() - started)
        request = (modality, mime, limits, spec, self._cpu_seconds)
        try:
            return await self._decode_once(request, data)
        except _RetryOnce:
            # The decoder died holding the item, and not of its CPU cap: killed from
            # outside (the kernel's OOM killer, an operator) as often as by the item.
            # A valid item must not be refused for that; a second death is final.
            pass
        try:
            return await self._decode_once(request, data)
        except _RetryOnce:
            raise DecodingStoppedError("the decoder process died on this item, twice") from None

    async def _decode_once(self, request: tuple[Any, ...], data: bytes) -> DecodedMedia:
        slot = await self._free.get()
        healthy = True
        started = time.thread_time()

        def sent() -> None:
            if self._on_submit_cpu is not None:
                self._on_submit_cpu(time.thread_time() - started)

        try:
            async with asyncio.timeout(self._timeout_s):
                media, cpu = await slot.decode(request, data, sent)
            if self._on_cpu is not None:
                self._on_cpu(cpu)
            return media
        except TimeoutError:
            healthy = False
            self._failed("timeout")
            raise DecodingStoppedError(
                f"decoding took longer than {self._timeout_s:g} s and was stopped"
            ) from None
        except _DecoderDied:
            healthy = False
            self._failed("crash")
            await asyncio.to_thread(slot.process.join, _REAP_S)
            if slot.process.exitcode == -signal.SIGXCPU:  # the item spun past its CPU cap
                raise DecodingStoppedError(
                    "decoding used more CPU time than the decoder is allowed"
                ) from None
            raise _RetryOnce() from None
        except UndecodableError as error:
            if str(error) == _OUT_OF_MEMORY:
                self._failed("memory")
            raise
        finally:
            if healthy:
                self._free.put_nowait(slot)
            else:
                slot.kill()
                self._free.put_nowait(self._new_slot())

    def _failed(self, kind: str) -> None:
        if self._on_failure is not None:
            self._on_failure(kind)

    def close(self) -> None:
        while not self._free.empty():
            slot = self._free.get_nowait()
            slot.kill()
