"""The HTTP layer: routes, schemas, SSE framing, OpenAPI, security, the buffering worker and graceful shutdown."""
