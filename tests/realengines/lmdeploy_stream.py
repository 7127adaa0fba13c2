"""Write a stream the way LMDeploy 0.18's server does, with its own response models; run by
.venv-lmdeploy's Python.

``lmdeploy/serve/openai/protocol.py`` needs only pydantic (and ``shortuuid`` for default ids, which
are never used here: every id is given), so it is loaded on its own and nothing else of LMDeploy
runs. Each event is serialised as ``chat_completions/serving.py`` and ``endpoints/completions.py``
do: a chunk is ``model_dump(mode="json", exclude_none=True)``, with ``usage`` set to None afterwards
when usage was asked for, written by ``json.dumps``; chat's usage chunk is
``model_dump_json(exclude_none=True)`` of a ``UsageInfo.build`` (no cached or reasoning tokens),
completions' a ``json.dumps`` of the usage summed into a ``UsageInfo()``.

Input (stdin): ``{"kind": "chat"|"completion", "include_usage": bool, "events": [<parsed event>]}``,
the events of a stream before ``[DONE]``. Output (stdout): the stream's bytes, ``[DONE]`` included.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any


def _protocol() -> Any:
    spec = importlib.util.find_spec("lmdeploy")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("lmdeploy is not installed here")
    root = Path(next(iter(spec.submodule_search_locations)))
    sys.modules.setdefault("shortuuid", types.ModuleType("shortuuid"))
    loaded = importlib.util.spec_from_file_location("lmdeploy_openai_protocol", root / "serve/openai/protocol.py")
    assert loaded is not None and loaded.loader is not None
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def main() -> None:
    p = _protocol()
    request = json.load(sys.stdin)
    chat, asked = request["kind"] == "chat", request["include_usage"]
    out = []
    for event in request["events"]:
        head = {"id": event["id"], "created": event["created"], "model": event["model"]}
        if not event["choices"]:
            counts = event["usage"]
            if chat:
                usage = p.UsageInfo.build(
                    prompt_tokens=counts["prompt_tokens"], completion_tokens=counts["completion_tokens"]
                )
                out.append(
                    p.ChatCompletionStreamResponse(**head, choices=[], usage=usage).model_dump_json(exclude_none=True)
                )
            else:
                usage = p.UsageInfo()
                usage.prompt_tokens += counts["prompt_tokens"]
                usage.completion_tokens += counts["completion_tokens"]
                usage.total_tokens += counts["prompt_tokens"] + counts["completion_tokens"]
                response = p.CompletionStreamResponse(**head, choices=[], usage=usage)
                out.append(json.dumps(response.model_dump(mode="json", exclude_none=True)))
            continue
        choice = event["choices"][0]
        if chat:
            stream_choice = p.ChatCompletionResponseStreamChoice(
                index=choice["index"],
                delta=p.DeltaMessage(**choice["delta"]),
                finish_reason=choice.get("finish_reason"),
            )
            response = p.ChatCompletionStreamResponse(**head, choices=[stream_choice], usage=None)
        else:
            stream_choice = p.CompletionResponseStreamChoice(
                index=choice["index"], text=choice["text"], finish_reason=choice.get("finish_reason")
            )
            response = p.CompletionStreamResponse(**head, choices=[stream_choice], usage=None)
        dumped = response.model_dump(mode="json", exclude_none=True)
        if asked:
            dumped["usage"] = None
        out.append(json.dumps(dumped))
    sys.stdout.write("".join(f"data: {data}\n\n" for data in out) + "data: [DONE]\n\n")


if __name__ == "__main__":
    main()
