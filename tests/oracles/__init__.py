"""Independent, test-only implementations of the papers in diffusers terms. Never imported by the pack."""
