"""The assembly of streamed tool-call fragments into complete tool calls."""

from __future__ import annotations

from ..domain import ToolCall, ToolCallDelta


class ToolCallAssembler:
    """Joins streamed tool-call fragments by index into complete calls."""

    def __init__(self) -> None:
        self._calls: dict[int, list[str]] = {}

    def add(self, fragments: tuple[ToolCallDelta, ...]) -> None:
        """Adds fragments: the first of an index sets id and name; arguments concatenate."""
        for fragment in fragments:
            call = self._calls.setdefault(fragment.index, ["", "", ""])
            if fragment.id:
                call[0] = fragment.id
            if fragment.name:
                call[1] = fragment.name
            call[2] += fragment.arguments

    def calls(self, request_id: str) -> tuple[ToolCall, ...]:
        """The assembled calls by index; a call without an id gets `call_<request id>_<index>`."""
        return tuple(
            ToolCall(id=c[0] or f"call_{request_id}_{i}", name=c[1], arguments=c[2])
            for i, c in sorted(self._calls.items())
        )
