"""The operator surfaces: metrics, the access log, the admin listener and ``/status``."""
