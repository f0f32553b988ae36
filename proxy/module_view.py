"""Swapping one name that a hypercorn module looks up in a library module.

Owns :func:`install_view`. hypercorn reaches some of its collaborators through module
attributes (``hypercorn.trio.run.trio``, ``hypercorn.protocol.h2.priority``); replacing
such an attribute with a view of the library that differs in one class is the narrowest
seam into it (``proxy.batch_accept``, ``proxy.h2_schedule``).
"""

from __future__ import annotations

import types


def install_view(host: types.ModuleType, name: str, original: types.ModuleType,
                 view: type[types.ModuleType]) -> bool:
    """Set ``host.name`` to a ``view`` of ``original``; True when it is (or already was)
    in place, False (nothing changed) when ``host.name`` is not ``original``: the
    installed hypercorn is not laid out as expected."""
    current = getattr(host, name, None)
    if isinstance(current, view):
        return True
    if current is not original:
        return False
    setattr(host, name, view(original.__name__))
    return True
