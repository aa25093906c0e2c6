"""The process stage: the composition root (``app.Gateway``), serving, the supervisor and
its workers, the command line and the demo.
"""
