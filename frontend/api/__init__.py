"""The HTTP API: request bodies, their parsing and validation, and the request they become."""
