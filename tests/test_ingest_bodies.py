"""How a pass asks its provider for member bodies: a few at a time, in order.

``fetch_many`` is called with groups of at most ``FETCH_GROUP`` members whose
announced sizes add up to at most ``FETCH_GROUP_BYTES`` (a message over that
goes alone), so round trips stay few and memory stays bounded. A provider that
only implements ``fetch`` is served by the default ``fetch_many``.
"""

from __future__ import annotations

from typing import Any

from threadsync.core.provider import Account, Folder, HeaderSummary, Provider
from threadsync.core.sync.ingest import FETCH_GROUP, FETCH_GROUP_BYTES, _fetch_groups


class FetchOnly(Provider):
    """A provider that implements ``fetch`` and not ``fetch_many``."""

    name = "fetch_only"

    def __init__(self) -> None:
        super().__init__(Account("me@example.org"))
        self.fetched: list[str] = []

    async def fetch(self, folder: Folder, ref: str) -> bytes:
        self.fetched.append(ref)
        return ref.encode()

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def folders(self) -> list[Folder]: ...  # type: ignore[empty-body]
    async def changes(self, *args: Any, **kwargs: Any) -> Any: ...
    async def send(self, *args: Any) -> None: ...
    async def find_sent(self, message_id: str) -> bool: ...  # type: ignore[empty-body]


def members(*sizes: int | None) -> list[tuple[HeaderSummary, str]]:
    return [
        (HeaderSummary(ref=str(i), message_id=f"<{i}@x>", size=size), "thread")
        for i, size in enumerate(sizes)
    ]


def refs(groups: list[list[tuple[HeaderSummary, str]]]) -> list[list[str]]:
    return [[h.ref for h, _ in group] for group in groups]


def test_groups_are_bounded_by_count_and_size_and_keep_the_order() -> None:
    many = members(*[1000] * (2 * FETCH_GROUP + 1))
    groups = list(_fetch_groups(many))
    assert [len(g) for g in groups] == [FETCH_GROUP, FETCH_GROUP, 1]
    assert [ref for group in refs(groups) for ref in group] == [h.ref for h, _ in many]

    half = FETCH_GROUP_BYTES // 2
    assert refs(list(_fetch_groups(members(half, half, 1, None, 3 * half, 5)))) == [
        ["0", "1"],  # exactly the budget
        ["2", "3"],  # an unknown size counts as nothing
        ["4"],  # over the budget: alone
        ["5"],
    ]
    assert list(_fetch_groups([])) == []


async def test_the_default_fetch_many_fetches_each_ref() -> None:
    provider = FetchOnly()
    bodies = await provider.fetch_many(Folder("INBOX", "inbox"), ["3", "1"])
    assert bodies == {"3": b"3", "1": b"1"}
    assert provider.fetched == ["3", "1"]
