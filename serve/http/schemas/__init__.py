"""Request models (pydantic) and response bodies, one module per API style."""
