"""Token estimates, test directives, meta-routing and generated answers.

Everything here is pure and deterministic: the same request always produces the same
answer and the same usage numbers.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import orjson

MESSAGE_OVERHEAD_TOKENS = 3
"""Tokens charged per message for role and separators (as in OpenAI's cookbook)."""
REPLY_PRIMING_TOKENS = 3
"""Tokens charged once per request for priming the assistant turn."""
NON_TEXT_PART_TOKENS = 85
"""Flat charge for an image/audio/document part (a low-detail image costs 85)."""

META_ROUTER_MARKER = "Reply with exactly one word: NANO, STANDARD, or PREMIUM"
"""A system prompt containing this phrase makes the simulator act as a tier router."""

_PREMIUM_KEYWORDS = (
    "architecture", "architect", "prove", "proof", "theorem", "multi-step", "multistep",
    "debug", "root cause", "distributed system", "refactor", "optimize", "optimise",
    "concurrency", "security audit", "trade-off", "tradeoff", "derive",
)  # fmt: skip
_NANO_KEYWORDS = (
    "classify", "classification", "extract", "route", "yes/no", "yes or no",
    "true/false", "label", "sentiment", "categorize", "categorise", "tag ",
    "detect the language", "which language",
)  # fmt: skip

_REPLY_RE = re.compile(r"#sim:reply=([^\r\n]*)")
_STATUS_RE = re.compile(r"#sim:status=(\d{3})\b")
_RETRY_AFTER_RE = re.compile(r"#sim:retry_after=(\d{1,4}(?:\.\d{1,3})?)")
_BATCH_RE = re.compile(r"#sim:batch-(error|expire)(?:=(\d{3}))?")
_NON_TEXT_PART_TYPES = frozenset(
    {"image", "image_url", "input_image", "input_audio", "audio", "document", "file"}
)

# Every filler word is three letters plus a space, so n words estimate to n tokens.
_FILLER_WORDS = (
    "the", "sim", "one", "two", "red", "sky", "sea", "box", "cat", "dog", "run", "fly",
    "log", "map", "set", "key", "row", "col", "bit", "net", "api", "job", "ack", "end",
    "new", "old", "big", "low", "top", "raw", "hot", "ice", "day", "way", "use", "add",
)  # fmt: skip
_FILLER_UNIT = "".join(w + " " for w in _FILLER_WORDS)
_FILLER_WORDS_N = len(_FILLER_WORDS)


def estimate_text_tokens(text: str) -> int:
    """About four characters per token, at least one."""
    return max(1, (len(text) + 3) // 4)


def part_text(part: Any) -> tuple[str, int]:
    """Text of one content part and the tokens it costs beyond that text."""
    if isinstance(part, str):
        return part, 0
    if not isinstance(part, dict):
        return "", 0
    text = part.get("text")
    if isinstance(text, str):
        return text, 0
    kind = part.get("type")
    if kind in _NON_TEXT_PART_TYPES:
        return "", NON_TEXT_PART_TOKENS
    if kind == "tool_result":
        inner, extra = content_text(part.get("content"))
        return inner, extra
    # tool_use, tool calls and anything unknown: charge its JSON size.
    return "", estimate_text_tokens(orjson.dumps(part).decode())


def content_text(content: Any) -> tuple[str, int]:
    """Text of a message ``content`` (string or list of parts) and its extra tokens."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        return "", 0
    texts: list[str] = []
    extra = 0
    for part in content:
        text, cost = part_text(part)
        if text:
            texts.append(text)
        extra += cost
    return "\n".join(texts), extra


@dataclass(frozen=True, slots=True)
class Answer:
    text: str
    output_tokens: int
    truncated: bool


def content_hash(model: str, texts: list[str]) -> int:
    digest = hashlib.blake2b(digest_size=8)
    digest.update(model.encode())
    for text in texts:
        digest.update(b"\x00")
        digest.update(text.encode())
    return int.from_bytes(digest.digest(), "little")


def find_status_directive(text: str) -> int | None:
    """The HTTP status of a ``#sim:status=<code>`` directive (400-599), if any."""
    if "#sim:" not in text:
        return None
    match = _STATUS_RE.search(text)
    if match is None:
        return None
    code = int(match.group(1))
    return code if 400 <= code <= 599 else None


def find_retry_after_directive(text: str) -> float | None:
    """The seconds of a ``#sim:retry_after=<s>`` directive (a 429 directive's Retry-After)."""
    if "#sim:" not in text:
        return None
    match = _RETRY_AFTER_RE.search(text)
    return None if match is None else float(match.group(1))


@dataclass(frozen=True, slots=True)
class BatchDirective:
    """What a ``#sim:batch-error[=<code>]`` or ``#sim:batch-expire`` directive asks for."""

    expire: bool
    status: int
    """HTTP status of the item's error (500 unless ``#sim:batch-error=<code>``)."""


def find_batch_directive(text: str) -> BatchDirective | None:
    """A batch item's directive: ``#sim:batch-error`` (500), ``#sim:batch-error=<code>``
    (400-599) or ``#sim:batch-expire``. Online calls ignore it."""
    if "#sim:batch-" not in text:
        return None
    match = _BATCH_RE.search(text)
    if match is None:
        return None
    if match.group(1) == "expire":
        return BatchDirective(expire=True, status=0)
    code = int(match.group(2)) if match.group(2) else 500
    return BatchDirective(expire=False, status=code if 400 <= code <= 599 else 500)


def find_reply_directive(text: str) -> str | None:
    if "#sim:" not in text:
        return None
    match = _REPLY_RE.search(text)
    return None if match is None else match.group(1)


def route_tier(user_text: str) -> str:
    """NANO, STANDARD or PREMIUM by a keyword heuristic on the user's text."""
    lowered = user_text.lower()
    if any(word in lowered for word in _PREMIUM_KEYWORDS):
        return "PREMIUM"
    if any(word in lowered for word in _NANO_KEYWORDS):
        return "NANO"
    return "STANDARD"


class AnswerMaker:
    """Builds the deterministic answer to a request."""

    def __init__(self, tokens_min: int, tokens_max: int) -> None:
        self._tokens_min = tokens_min
        self._span = tokens_max - tokens_min + 1
        copies = (tokens_max + _FILLER_WORDS_N) // _FILLER_WORDS_N + 1
        self._filler = _FILLER_UNIT * copies

    def filler(self, tokens: int, start: int) -> str:
        offset = 4 * (start % _FILLER_WORDS_N)
        return self._filler[offset : offset + 4 * tokens - 1]

    def answer(
        self,
        *,
        model: str,
        texts: list[str],
        user_text: str,
        system_text: str,
        max_tokens: int,
    ) -> Answer:
        reply = find_reply_directive(user_text)
        if reply is None and META_ROUTER_MARKER in system_text:
            reply = route_tier(user_text)
        if reply is not None:
            needed = estimate_text_tokens(reply)
            return Answer(reply, min(needed, max_tokens), needed > max_tokens)
        digest = content_hash(model, texts)
        natural = self._tokens_min + digest % self._span
        tokens = min(natural, max_tokens)
        return Answer(self.filler(tokens, digest >> 32), tokens, natural >= max_tokens)
