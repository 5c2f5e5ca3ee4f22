"""The one result type of a search, shared by `retrieve`, the Python API and the service."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Hit:
    """One search result: 1-based `rank`, the item (`id`, `path`, `label`, `class_name`), `score`: its raw cosine
    similarity to the query (always, re-ranked or not), `rerank_score`: the score a re-ranking ordered the list by
    (None when none did), `same_class`: whether its class is the query's (None when either class is unknown), and
    `same_image`: whether its image file holds the query image's very bytes (a copy of the query)."""

    rank: int
    id: int
    score: float
    path: str
    label: int | None
    class_name: str | None
    same_class: bool | None = None
    rerank_score: float | None = None
    same_image: bool = False

    def to_dict(self) -> dict:
        return dict(vars(self))  # every field is a plain value: no deep copy needed (asdict's took 75 µs a hit)


def judged(hits: list[Hit], query_label: int | None) -> list[Hit]:
    """`hits` with `same_class` set against the query's label (None where either label is unknown)."""
    return [
        replace(h, same_class=None if query_label is None or h.label is None else h.label == query_label) for h in hits
    ]
