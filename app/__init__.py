"""tmrl application layer: CLI, orchestration, configuration and tracking."""
