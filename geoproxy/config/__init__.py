"""The config stage: YAML read and validated once (``loader``, over ``schema``), the frozen
values it builds (``values``), and what is derived from them (``model``, ``access``,
``countries``, ``changes``). Imports nothing of the later stages.
"""
