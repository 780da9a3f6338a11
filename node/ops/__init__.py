"""Operating the node: configuration, CLI, HTTP (metrics, health), audit, submitter tools."""
