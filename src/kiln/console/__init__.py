"""The web console at `/console` on the management port (docs/architecture.md, "The console").

It reads and changes only through the management REST routes (in-process
sub-requests carrying the session's key), so a session can do exactly what its
key can do with curl.
"""
