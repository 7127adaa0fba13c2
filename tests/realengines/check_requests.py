"""Validate request bodies with vLLM's own request models; run with .venv-vllm's python.

Reads a JSON list of ``{"path", "body"}`` on stdin and prints a JSON list of error strings (None
where vLLM takes the body): the body must pass ``ChatCompletionRequest`` or ``CompletionRequest``
(pydantic, as the server's route does) and turn into ``SamplingParams`` with the output budget the
server computes for it (``get_max_tokens``), which is where vLLM refuses ``min_tokens`` above
``max_tokens``. Used by tests/realengines/test_vllm_request_models.py.
"""

from __future__ import annotations

import json
import sys

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.utils.api_utils import get_max_tokens

MAX_MODEL_LEN = 2048
PROMPT_TOKENS = 64


def check(path: str, body: dict) -> str | None:
    try:
        if path.endswith("/chat/completions"):
            chat = ChatCompletionRequest.model_validate(body)
            wanted = chat.max_completion_tokens if chat.max_completion_tokens is not None else chat.max_tokens
            chat.to_sampling_params(get_max_tokens(MAX_MODEL_LEN, wanted, PROMPT_TOKENS, {}), {})
        else:
            completion = CompletionRequest.model_validate(body)
            completion.to_sampling_params(get_max_tokens(MAX_MODEL_LEN, completion.max_tokens, PROMPT_TOKENS, {}), {})
    except Exception as exc:  # any refusal is the answer
        return f"{type(exc).__name__}: {exc}"
    return None


if __name__ == "__main__":
    print(json.dumps([check(item["path"], item["body"]) for item in json.load(sys.stdin)]))
