"""The deterministic output function the proxy's tests rely on."""

from __future__ import annotations

from enginesim import chat_prompt_text, expected_completion, expected_finish_reason
from enginesim.textgen import VOCAB, completion_prompt_texts, natural_length


def test_it_answers_the_same_text_for_the_same_prompt():
    assert expected_completion("hello world") == expected_completion("hello world")


def test_different_prompts_get_different_answers():
    assert expected_completion("hello world") != expected_completion("hello there")


def test_max_tokens_truncates_to_that_many_tokens_with_length():
    text = expected_completion("[[len=20]] tell me", 5)
    assert len(text.split()) == 5
    assert all(word in VOCAB for word in text.split())
    assert expected_finish_reason("[[len=20]] tell me", 5) == "length"


def test_a_budget_above_the_natural_length_stops_by_itself():
    prompt = "[[len=7]] short answer"
    assert len(expected_completion(prompt, 100).split()) == 7
    assert expected_finish_reason(prompt, 100) == "stop"
    assert expected_completion(prompt) == expected_completion(prompt, 100)


def test_the_eos_marker_ends_after_one_token():
    assert natural_length("say nothing [[eos]]") == 1
    assert len(expected_completion("say nothing [[eos]]").split()) == 1


def test_natural_lengths_stay_between_8_and_24_tokens():
    lengths = {natural_length(f"prompt {i}") for i in range(200)}
    assert min(lengths) >= 8 and max(lengths) <= 24 and len(lengths) > 5


def test_chat_prompt_text_is_one_line_per_message_with_text_parts_joined():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]},
    ]
    assert chat_prompt_text(messages) == "system: be brief\nuser: hi there"


def test_completion_prompts_can_be_batches_or_token_ids():
    assert completion_prompt_texts("a") == ["a"]
    assert completion_prompt_texts(["a", "b"]) == ["a", "b"]
    assert completion_prompt_texts([1, 2, 3]) == ["1 2 3"]
    assert completion_prompt_texts([[1, 2], [3]]) == ["1 2", "3"]
    assert completion_prompt_texts(42) is None
