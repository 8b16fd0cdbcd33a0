"""Adapters to other tools' interfaces. Each imports its tool on import: load them only when used."""
