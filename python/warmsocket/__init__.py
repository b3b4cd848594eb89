"""warmsocket: a session-state cache and Responses API WebSocket mode for any backend.

Importing this package gives the embedded cache library only; the server stack
(`warmsocket.server`) is imported on demand.
"""

from warmsocket._core import __version__

__all__ = ["__version__"]
