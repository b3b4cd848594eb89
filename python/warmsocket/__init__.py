"""warmsocket: a session-state cache and Responses API WebSocket mode for any backend.

Importing this package gives the embedded cache library only; the server stack
(`warmsocket.server`) is imported on demand.
"""

from warmsocket._core import (
    BUILD_PROFILE,
    Binding,
    CacheError,
    CacheFull,
    CacheStats,
    ContextView,
    DuplicateResponseId,
    InvalidItems,
    ItemMeta,
    ItemNotJson,
    ItemNotObject,
    Items,
    ItemsLike,
    ItemTooLarge,
    OwnerMismatch,
    ResponseInfo,
    ResponseNotFound,
    SessionCache,
    SnapshotError,
    WarmsocketError,
    __version__,
)

__all__ = [
    "BUILD_PROFILE",
    "Binding",
    "CacheError",
    "CacheFull",
    "CacheStats",
    "ContextView",
    "DuplicateResponseId",
    "InvalidItems",
    "ItemMeta",
    "ItemNotJson",
    "ItemNotObject",
    "ItemTooLarge",
    "Items",
    "ItemsLike",
    "OwnerMismatch",
    "ResponseInfo",
    "ResponseNotFound",
    "SessionCache",
    "SnapshotError",
    "WarmsocketError",
    "__version__",
]
