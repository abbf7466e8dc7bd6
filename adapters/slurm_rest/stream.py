"""The items of one list in a JSON answer, read as the answer arrives.

slurmrestd's accounting answer is one object, ``{"jobs": [...], "meta": ..., "errors":
[...], ...}`` (the keys' order differs between versions). When it is too large to
hold (usage import: many jobs of one account ending in the same second), the jobs
are taken one at a time: :class:`ItemStream` is fed the answer's text in pieces
and gives back each complete element of the list under ``key`` as soon as its
closing brace arrived; the other top-level values (small: errors, warnings, meta)
are kept for :meth:`ItemStream.finish`. What is held at a time is one element (at
most ``max_item_chars``) plus the piece being read. Each element is decoded by the
standard library's C decoder (``raw_decode``), never by a Python loop per byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from broker.adapter import AdapterError, OutputTooLarge

__all__ = ["ItemStream"]

_SPACE = " \t\r\n"
#: consumed text is dropped from the buffer once this much of it has piled up
_COMPACT_AT = 1 << 16


class ItemStream:
    """Incremental reader of the elements of ``body[key]`` (see the module docstring)."""

    def __init__(self, key: str, *, max_item_chars: int, during: str) -> None:
        self._key = key
        self._cap = max_item_chars
        self._during = during
        self._decoder = json.JSONDecoder()
        self._buf = ""
        self._pos = 0
        #: "start" ({), "key", "colon", "value" (of another key), "list" (the key's [),
        #: "item" (in the list), "end"
        self._state = "start"
        self._name = ""
        self._others: dict[str, Any] = {}
        self._others_size = 0

    def feed(self, text: str) -> Iterator[Any]:
        """Add the next piece of the answer; yields the elements it completed."""
        self._buf += text
        yield from self._advance(eof=False)
        if self._pos > _COMPACT_AT:
            self._buf, self._pos = self._buf[self._pos:], 0
        if len(self._buf) - self._pos > self._cap:
            raise OutputTooLarge(f"slurmrestd {self._during}: one value of the answer exceeds {self._cap} "
                                 "characters (or the answer is not JSON)")

    def finish(self) -> dict[str, Any]:
        """The answer has ended: the top-level values other than ``key``. A truncated
        or malformed answer raises ``bad_response``."""
        for _ in self._advance(eof=True):
            raise AssertionError("unreachable")  # pragma: no cover - every element was taken by feed()
        if self._state != "end" or self._buf[self._pos:].strip(_SPACE):
            raise AdapterError(f"slurmrestd {self._during}: the answer ended early or is not a JSON object",
                               transient=True, code="bad_response")
        return self._others

    def _skip(self) -> str:
        """The next non-blank character ("" when none has arrived yet)."""
        buf, pos = self._buf, self._pos
        while pos < len(buf) and buf[pos] in _SPACE:
            pos += 1
        self._pos = pos
        return buf[pos] if pos < len(buf) else ""

    def _decode(self, eof: bool) -> tuple[bool, Any]:
        """(True, value) for a complete value at the position, (False, None) to wait."""
        try:
            value, end = self._decoder.raw_decode(self._buf, self._pos)
        except json.JSONDecodeError:
            if eof:
                raise AdapterError(f"slurmrestd {self._during}: the answer is not valid JSON",
                                   transient=True, code="bad_response") from None
            return False, None
        # a number, true, false or null at the end of what arrived may go on in the next piece
        if not eof and end == len(self._buf) and not isinstance(value, dict | list | str):
            return False, None
        self._pos = end
        return True, value

    def _advance(self, *, eof: bool) -> Iterator[Any]:
        while True:
            char = self._skip()
            if not char:
                return
            state = self._state
            if state == "start":
                if char != "{":
                    raise AdapterError(f"slurmrestd {self._during}: the answer is not a JSON object",
                                       transient=True, code="bad_response")
                self._pos += 1
                self._state = "key"
            elif state in ("key", "item"):  # a member's name, or the list's next element
                if char == ",":
                    self._pos += 1
                    continue
                if char == ("}" if state == "key" else "]"):
                    self._pos += 1
                    self._state = "end" if state == "key" else "key"
                    continue
                done, value = self._decode(eof)
                if not done:
                    return
                if state == "item":
                    yield value
                else:
                    self._name, self._state = str(value), "colon"
            elif state == "colon":
                if char != ":":
                    raise AdapterError(f"slurmrestd {self._during}: the answer is not valid JSON",
                                       transient=True, code="bad_response")
                self._pos += 1
                self._state = "list" if self._name == self._key else "value"
            elif state == "list" and char == "[":
                self._pos += 1
                self._state = "item"
            elif state in ("list", "value"):  # the key's value is not a list: kept like any other
                start = self._pos
                done, value = self._decode(eof)
                if not done:
                    return
                self._others_size += self._pos - start
                if self._others_size > self._cap:
                    raise OutputTooLarge(f"slurmrestd {self._during}: the answer's other values exceed "
                                         f"{self._cap} characters")
                self._others[self._name] = value
                self._state = "key"
            else:  # "end": only blanks may follow
                return
