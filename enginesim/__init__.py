"""A simulated LLM inference engine that speaks NanoDeploy/DLEngine, vLLM, SGLang, LMDeploy and plain OpenAI.

Test and benchmark tooling, not part of the product: it is left out of the wheel and imports nothing of
RouterPanel's (no Django, no database). Run one engine with ``python -m enginesim``, the demo fleet with
``python -m enginesim.demo``; tests start engines with ``enginesim.testing.run_simulator`` and compute
what they answer with ``expected_completion`` (see ``textgen``). ``enginesim/README.md`` describes the
wire behaviour.
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
