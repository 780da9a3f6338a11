"""The MQTT bus: the client sessions (submissions, consensus) and the embedded broker."""
