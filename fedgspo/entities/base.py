"""Entity: a versioned, immutable pydantic record.

Every entity carries two identities:

* ``ecs_id`` names *this version*; it never changes and never names another version.
* ``lineage_id`` names *the thing*; every version of one thing shares it.

Versions form a chain: version 0 has no ``previous_ecs_id``; version ``v > 0`` points to the
``ecs_id`` of version ``v - 1``. Only :class:`~fedgspo.entities.registry.EntityRegistry` makes
new versions (:meth:`Entity.next_version`); user code changes fields with :meth:`Entity.evolve`,
which keeps the identity so the registry can tell which version a change was derived from.

Entities are frozen so a cached version can be shared between threads without copies. Entities
refer to one another by ``lineage_id`` (a stable reference that follows updates).

Failure behaviour: construction and :meth:`Entity.evolve` raise ``pydantic.ValidationError``
naming the offending field; nothing is registered or changed on error.
"""

from __future__ import annotations

import copy
import uuid
from datetime import datetime, timezone
from typing import Any, ClassVar, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator

E = TypeVar("E", bound="Entity")

IDENTITY_FIELDS = frozenset({"ecs_id", "lineage_id", "version", "previous_ecs_id", "created_at"})

_MUTABLE = (list, dict, set, BaseModel)

_ENTITY_TYPES: dict[str, type["Entity"]] = {}


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Entity(BaseModel):
    """Base of every registered record: identity, version chain and creation time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    entity_types: ClassVar[dict[str, type["Entity"]]] = _ENTITY_TYPES

    ecs_id: UUID = Field(default_factory=uuid.uuid4, description="Identity of this version.")
    lineage_id: UUID = Field(
        default_factory=uuid.uuid4, description="Identity shared by all versions of one thing."
    )
    version: int = Field(0, ge=0, description="0 for the first version, +1 per update.")
    previous_ecs_id: UUID | None = Field(None, description="ecs_id of version - 1; None at 0.")
    created_at: datetime = Field(default_factory=_now, description="When this version was made.")

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """Record every subclass by class name so stored rows can be rebuilt by type name.

        Raises ``TypeError`` if two different classes share a name (the stored type column
        would be ambiguous).
        """
        super().__pydantic_init_subclass__(**kwargs)
        known = _ENTITY_TYPES.get(cls.__name__)
        if known is not None and (known.__module__, known.__qualname__) != (
            cls.__module__,
            cls.__qualname__,
        ):
            raise TypeError(
                f"entity type name {cls.__name__!r} already used by {known.__module__}.{known.__qualname__}"
            )
        _ENTITY_TYPES[cls.__name__] = cls

    @model_validator(mode="after")
    def _version_chain(self) -> "Entity":
        if self.version == 0 and self.previous_ecs_id is not None:
            raise ValueError("version 0 cannot have a previous_ecs_id")
        if self.version > 0 and self.previous_ecs_id is None:
            raise ValueError(f"version {self.version} needs a previous_ecs_id")
        if self.previous_ecs_id == self.ecs_id:
            raise ValueError("previous_ecs_id cannot equal ecs_id")
        return self

    @classmethod
    def type_name(cls) -> str:
        """Name stored in the registry's type column."""
        return cls.__name__

    @classmethod
    def with_subtypes(cls) -> list[str]:
        """Type names of this class and every subclass (for queries by type)."""
        names, stack = [], [cls]
        while stack:
            c = stack.pop()
            names.append(c.__name__)
            stack.extend(c.__subclasses__())
        return names

    @staticmethod
    def resolve_type(name: str) -> type["Entity"]:
        """The entity class stored under ``name``; ``KeyError`` lists the known names.

        A class is known once its module has been imported.
        """
        try:
            return _ENTITY_TYPES[name]
        except KeyError:
            raise KeyError(
                f"unknown entity type {name!r}; known: {', '.join(sorted(_ENTITY_TYPES))}"
            ) from None

    def evolve(self: E, **changes: Any) -> E:
        """A validated copy with ``changes`` applied and the same identity.

        The registry turns it into a new version on commit. Changing an identity field is a
        ``ValueError``; invalid values raise ``pydantic.ValidationError``.
        """
        forbidden = IDENTITY_FIELDS.intersection(changes)
        if forbidden:
            raise ValueError(f"identity fields cannot be changed: {', '.join(sorted(forbidden))}")
        return type(self)(**{**self.__dict__, **changes})

    def staged_copy(self: E) -> E:
        """A copy whose mutable fields (lists, dicts, sets, models) are deep copies.

        Immutable values (ids, numbers, strings, datetimes) are shared, which makes this much
        cheaper than ``model_copy(deep=True)`` while giving the same isolation.
        """
        mutable = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if isinstance(v, _MUTABLE)}
        return self.model_copy(update=mutable) if mutable else self.model_copy()

    def revalidate(self: E) -> E:
        """Validate every field again (catches in-place edits of nested lists and dicts)."""
        return type(self).model_validate(dict(self.__dict__))

    def next_version(self: E, previous_ecs_id: UUID, previous_version: int) -> E:
        """This content as the version after ``previous_ecs_id``: fresh ``ecs_id``, same lineage.

        Used by the registry on commit, with the lineage head read inside its transaction.
        """
        return self.model_copy(
            update={
                "ecs_id": uuid.uuid4(),
                "version": previous_version + 1,
                "previous_ecs_id": previous_ecs_id,
                "created_at": _now(),
            }
        )
