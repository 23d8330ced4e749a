"""The stages as the frontend sees them: instances, routing, gRPC clients and the wire."""
