"""The engine: requests, scheduling, model execution and sampling."""
