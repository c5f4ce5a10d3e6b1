"""The HTTP layer: the Flask app, its routes and schemas, SSE, OpenAPI, security, slow clients and shutdown."""
