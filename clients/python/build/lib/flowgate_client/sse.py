"""A Server-Sent Events decoder (the WHATWG rules this client needs), fed line by line."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RawEvent:
    id: str | None
    event: str
    data: str


@dataclass(slots=True)
class Decoder:
    """Feed it the stream's lines (without their line ends); it returns an event when a
    blank line completes one. ``retry_ms`` holds the server's last ``retry:``."""

    retry_ms: int | None = None
    _data: list[str] = field(default_factory=list)
    _event: str = ""
    _id: str | None = None

    def feed(self, line: str) -> RawEvent | None:
        if not line:
            if not self._data:
                self._event, self._id = "", None
                return None
            event = RawEvent(self._id, self._event or "message", "\n".join(self._data))
            self._data, self._event, self._id = [], "", None
            return event
        if line.startswith(":"):
            return None  # a comment: a heartbeat
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None
