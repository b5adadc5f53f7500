"""Messaging between components and the host: send, request/response, broadcast."""
