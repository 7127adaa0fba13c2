"""A simulated LLM inference engine that speaks NanoDeploy/DLEngine, vLLM, SGLang, LMDeploy and plain OpenAI.

Run it with ``python manage.py simulate_engine`` or ``python -m enginesim`` (no Django needed).
Tests compute what it answers with ``expected_completion`` (see ``textgen``). It imports no Django
models and needs no database.
"""

from __future__ import annotations

from enginesim.textgen import (
    EOS_MARKER,
    chat_prompt_text,
    count_prompt_tokens,
    expected_completion,
    expected_finish_reason,
)

__all__ = [
    "EOS_MARKER",
    "chat_prompt_text",
    "count_prompt_tokens",
    "expected_completion",
    "expected_finish_reason",
]
