"""geoproxy: a geo-routing edge proxy for the Geode / Deployment Stamps pattern."""

__version__ = "0.1.0"
