"""Adapters that let pretrained model families join a shard (see docs/ENCODERS.md)."""
