"""Networks the runtime executes. Each module registers its components on import."""
