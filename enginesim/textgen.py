"""Deterministic "model output": what a simulated engine answers for a given prompt.

Every simulated engine (and every PD leg) produces the same tokens for the same prompt text, so tests
of the simulator and of the proxy can compute what must come back:

- The prompt text of a chat request is ``chat_prompt_text(messages)``: one line per message,
  ``"{role}: {content}"`` (list contents keep their ``text`` parts, joined by spaces), joined by ``\\n``.
  The prompt text of a completion is the prompt string; a token-id prompt is its ids joined by spaces.
- The seed is ``sha256(prompt_text)``. Token ids are successive 16-bit words of ``shake_128(seed)``
  modulo ``len(VOCAB)``; token ``i`` renders as ``" " + VOCAB[id]``.
- The answer's natural length is ``8 + seed[0] % 17`` tokens (8..24), or ``natural_tokens`` when the
  engine runs with ``--natural-tokens N``; it ends with ``finish_reason "stop"``. A ``max_tokens`` (or
  ``max_completion_tokens``) below it truncates with ``"length"``.
- Markers in the prompt force a length: ``[[eos]]`` makes the very first token the last one (EOS at
  prefill: a PD prefill engine then answers in full, without migration), ``[[len=N]]`` makes N tokens.
- ``prompt_tokens`` in ``usage`` is the number of whitespace-separated words (at least 1).
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Sequence
from typing import Any

VOCAB: tuple[str, ...] = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray",
    "yankee", "zulu", "amber", "basil", "cedar", "dune", "ember", "fjord",
    "grove", "harbor", "island", "jade", "kelp", "lagoon", "meadow", "nectar",
    "orchid", "pebble", "quartz", "river", "summit", "tundra", "umber", "valley",
    "willow", "xenon", "yarrow", "zephyr", "anchor", "beacon", "comet", "drift",
    "eclipse", "flint", "glacier", "horizon", "ion", "jetty", "kernel", "lantern",
)  # fmt: skip

EOS_MARKER = "[[eos]]"
_LEN_MARKER = re.compile(r"\[\[len=(\d{1,5})\]\]")


def prompt_seed(prompt_text: str) -> bytes:
    """The 32-byte seed every generated token of this prompt derives from."""
    return hashlib.sha256(prompt_text.encode("utf-8", "surrogatepass")).digest()


def natural_length(prompt_text: str, seed: bytes | None = None, natural_tokens: int | None = None) -> int:
    """How many tokens the simulated model says before it stops by itself."""
    if EOS_MARKER in prompt_text:
        return 1
    forced = _LEN_MARKER.search(prompt_text)
    if forced:
        return max(1, int(forced.group(1)))
    if natural_tokens is not None:
        return natural_tokens
    seed = seed if seed is not None else prompt_seed(prompt_text)
    return 8 + seed[0] % 17


def token_ids_from_seed(seed: bytes, count: int) -> list[int]:
    """The first ``count`` token ids of the sequence a seed generates."""
    if count <= 0:
        return []
    stream = hashlib.shake_128(seed).digest(2 * count)
    size = len(VOCAB)
    return [value % size for value in struct.unpack(f">{count}H", stream)]  # each two bytes, big-endian


def piece(token_id: int) -> str:
    """The text of one token."""
    return " " + VOCAB[token_id % len(VOCAB)]


def plan_tokens(prompt_text: str, max_tokens: int | None, natural_tokens: int | None = None) -> tuple[list[int], str]:
    """Token ids the engine answers with and the finish reason (``stop`` or ``length``)."""
    seed = prompt_seed(prompt_text)
    return plan_tokens_from_seed(seed, natural_length(prompt_text, seed, natural_tokens), max_tokens)


def plan_tokens_from_seed(seed: bytes, natural: int, max_tokens: int | None) -> tuple[list[int], str]:
    """Like ``plan_tokens`` for a sequence known only by its seed (a migrated PD sequence)."""
    if max_tokens is not None and max_tokens < natural:
        return token_ids_from_seed(seed, max_tokens), "length"
    return token_ids_from_seed(seed, natural), "stop"


def expected_completion(prompt_text: str, max_tokens: int | None = None, *, natural_tokens: int | None = None) -> str:
    """The exact text a simulated engine returns for ``prompt_text`` (hybrid or through a PD pair).

    Pass ``natural_tokens`` when the engine runs with ``--natural-tokens``.
    """
    ids, _ = plan_tokens(prompt_text, max_tokens, natural_tokens)
    return "".join(piece(t) for t in ids)


def expected_finish_reason(
    prompt_text: str, max_tokens: int | None = None, *, natural_tokens: int | None = None
) -> str:
    """``"stop"`` when the model ends by itself within ``max_tokens``, else ``"length"``."""
    return plan_tokens(prompt_text, max_tokens, natural_tokens)[1]


def count_prompt_tokens(prompt_text: str) -> int:
    """``usage.prompt_tokens`` of a prompt: its whitespace-separated words, at least 1."""
    return max(1, len(prompt_text.split()))


def prompt_token_ids(prompt_text: str) -> list[int]:
    """Stable fake token ids of the prompt's words (what a migrated sequence carries)."""
    # surrogatepass: valid JSON may carry a lone surrogate ("\\ud800"), which strict UTF-8 refuses.
    return [
        int.from_bytes(hashlib.blake2b(w.encode("utf-8", "surrogatepass"), digest_size=2).digest(), "big")
        for w in prompt_text.split()
    ]


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return " ".join(parts)
    return "" if content is None else str(content)


def chat_prompt_text(messages: Sequence[Any]) -> str:
    """The prompt text of a chat request (see the module docstring)."""
    lines = []
    for message in messages:
        if isinstance(message, dict):
            lines.append(f"{message.get('role', '')}: {_content_text(message.get('content'))}")
    return "\n".join(lines)


def completion_prompt_texts(prompt: Any) -> list[str] | None:
    """The prompt texts of a completion request (one per batch entry), or None if malformed."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, int) for p in prompt):
            return [" ".join(str(p) for p in prompt)]
        if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            return [" ".join(str(t) for t in p) for p in prompt]
    return None
