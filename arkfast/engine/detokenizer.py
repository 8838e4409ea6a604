"""Incremental detokenization, to find stop strings as tokens arrive without re-decoding everything."""
from __future__ import annotations


class IncrementalDetokenizer:
    """Appends the text of newly generated tokens to :attr:`text` and finds stop strings in it.

    Decoding token by token is wrong for tokenizers whose pieces depend on their neighbours (a leading
    space, a multi-byte character split over tokens), so each update decodes a short window: tokens
    ``[prefix_offset, read_offset)`` were already turned into text; decoding ``[prefix_offset, end)``
    and dropping the window's old part gives exactly the new text. A window whose decoding ends in
    U+FFFD (an unfinished UTF-8 sequence) waits for the next token.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.max_stop_len = max((len(s) for s in stop), default=0)
        self.text = ""
        self.stopped = False  # a stop string was found (and cut off)
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def update(self, output_ids: list[int]) -> str | None:
        """Take the output tokens so far; returns the stop string found (``text`` is then cut just
        before it) or None."""
        old = self._decode(output_ids[self._prefix_offset:self._read_offset])
        new = self._decode(output_ids[self._prefix_offset:])
        if len(new) <= len(old) or new.endswith("\ufffd"):
            return None
        delta = new[len(old):]
        self._prefix_offset, self._read_offset = self._read_offset, len(output_ids)
        self.text += delta
        # A stop string may begin up to max_stop_len - 1 characters before the new text.
        start = max(0, len(self.text) - len(delta) - self.max_stop_len + 1)
        found = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if not found:
            return None
        index, stop = min(found)
        self.text = self.text[:index]
        self.stopped = True
        return stop
