"""SIP Thor: the peer-to-peer overlay of a SIP service platform.

The package root imports nothing so that every program can patch gevent
before any socket module is loaded.
"""

__version__ = "0.1.0"
