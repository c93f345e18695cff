"""Named registries: each component owns its vocabulary, and config validation reads it from here.

A registry maps the names a config key accepts (``MODEL.NAME``, ``MODEL.METHOD``,
``DATASETS.NAMES`` ...) to the objects that implement them. Components register their own entries
when their module is imported; :func:`configs.config.validate_cfg` derives the valid choices from
the registries, so a name registered by a user (``register_arch``, ``register_dataset``,
``register_recipe``) is valid in a config without editing the package.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name that its registry does not hold; the message names the key and the valid names.

    A ``KeyError`` (a failed lookup) and a ``ValueError`` (an invalid config value), so code that
    catches either sees it.
    """

    def __str__(self) -> str:  # KeyError quotes its argument; show the message as written
        return str(self.args[0])


def closest_names(name: str, valid: list[str], n: int = 1, cutoff: float = 0.4) -> list[str]:
    """The valid names closest to ``name`` (case-insensitive), best first.

    Args:
        name: the name as given.
        valid: the accepted names.
        n: at most this many suggestions.
        cutoff: similarity threshold in [0, 1] (difflib ratio).

    Returns:
        Up to ``n`` names of ``valid``.
    """
    lower = {v.lower(): v for v in valid}
    return [lower[m] for m in difflib.get_close_matches(name.lower(), list(lower), n, cutoff)]


class Registry(Generic[T]):
    """Names -> objects for one config key.

    Args:
        key: the config key whose values this registry names (used in error messages).
        what: what an entry is, in words ('architecture', 'dataset', 'method').
    """

    def __init__(self, key: str, what: str) -> None:
        self.key = key
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T, overwrite: bool = False) -> T:
        """Add ``obj`` under ``name``.

        Args:
            name: the config value that selects it.
            obj: the object.
            overwrite: replace an existing entry (otherwise a second registration is an error).

        Returns:
            ``obj`` (so this can be used inline or as a decorator's body).

        Raises:
            ValueError: ``name`` is taken and ``overwrite`` is False.
        """
        if name in self._items and not overwrite and self._items[name] is not obj:
            raise ValueError(f"{self.what} {name!r} is already registered for {self.key}")
        self._items[name] = obj
        return obj

    def remove(self, name: str) -> T:
        """Take ``name`` out of the registry (e.g. a test's temporary entry) and return it."""
        return self._items.pop(name)

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@registry.decorator('name')`` registers the decorated class or function."""
        return lambda obj: self.register(name, obj)

    def get(self, name: str) -> T:
        """The object registered under ``name``.

        Raises:
            UnknownNameError: naming the key, the closest valid name and every valid name.
        """
        if name in self._items:
            return self._items[name]
        raise UnknownNameError(self.unknown_message(name))

    def unknown_message(self, name: object) -> str:
        """The error text for an unknown value of this registry's key."""
        near = closest_names(str(name), self.names())
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return (
            f"{self.key} = {name!r} is not a known {self.what}{hint}; valid: "
            f"{', '.join(self.names())}"
        )

    def names(self) -> list[str]:
        """Every registered name, in registration order."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
