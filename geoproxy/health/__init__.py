"""The health stage: the health state of every geode (``board``: passes, failures, outlier
ejection; no I/O) and the active checks that feed it (``checker``).
"""
