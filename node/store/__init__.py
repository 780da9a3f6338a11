"""The durable store (SQLite in WAL mode), called through typed methods only."""
