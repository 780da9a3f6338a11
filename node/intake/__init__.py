"""Intake: what arrives on the bus before any heavy work.

The wire format and its canonical msgpack codec (bounded while decoding),
Ed25519 keys and signatures, and admission: one parse and one signature
check per submission, replay and duplicate checks, the rate limit, and the
durable write that comes before anything else (DESIGN.md §3, §8).
"""
