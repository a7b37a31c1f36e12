"""dpvr-surgery: convert LLaVA-style models to Dual-Path Vision Token Routing with Late-Layer Fusion."""

__version__ = "0.1.0"
