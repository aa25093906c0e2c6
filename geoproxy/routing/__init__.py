"""The routing stage: a request's client IP, region and ordered candidates, as pure
functions over the config and the health state, and the ``Runtime`` one process serves from.
"""
