"""Stratix streaming gateway: one upstream stream per resource, fanned out to browsers."""

__version__ = "0.1.0"
