"""Build the tiny models the real-engine tests serve with vLLM, with no download.

Run it with the vLLM virtualenv's Python (it needs torch, tokenizers and transformers, which stay
out of RouterPanel's own environment): ``.venv-vllm/bin/python tests/realengines/make_model.py``.
It prints the model directories as JSON. See docs/real-engines.md.

- ``chat``: a random eight-layer Llama (31 M parameters) for generation, with a byte-level BPE
  tokenizer trained on Python's own standard-library sources and a chat template, so
  /v1/completions and /v1/chat/completions both work. Its output is noise, but real tokens through
  real vLLM code. It is deliberately not smaller: at about 2 ms a token a smaller model finishes a
  stream before a client's disconnect can be seen, and keeps vLLM's API process too busy to answer
  /metrics meanwhile; at eight layers a token takes 10-25 ms on this machine.
- ``embed``: a two-layer Llama laid out as a Sentence Transformers model (``modules.json`` with
  mean pooling and normalisation), which vLLM serves as a pooling model for /v1/embeddings with no
  extra flags.

Everything is seeded, so two builds give the same files. A build goes to a temporary directory and
is renamed into place when complete; the directory name carries a hash of this file, so a changed
recipe builds afresh and an unchanged one returns at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO_ROOT / "var" / "realengines" / "models"

SEED = 1234
VOCAB_SIZE = 4096
MAX_POSITIONS = 2048
# vLLM's CPU attention kernel takes head sizes 32, 64, 80, ... (16 is refused): heads of 64.
SHAPES = {
    "chat": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8},
    "embed": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2},
}
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"
)
# Training text: these standard-library modules (fixed for a given Python), read in this order.
CORPUS_MODULES = [
    "argparse.py",
    "textwrap.py",
    "string.py",
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "collections/__init__.py",
    "functools.py",
    "pathlib.py",
    "shutil.py",
    "subprocess.py",
    "typing.py",
    "dataclasses.py",
    "logging/__init__.py",
    "email/message.py",
    "http/client.py",
]


def recipe_hash() -> str:
    """A short hash of this file: part of the output directory name, so a new recipe rebuilds."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def corpus() -> Iterator[str]:
    """The training text: the listed standard-library sources, line by line."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in CORPUS_MODULES:
        path = stdlib / name
        if path.exists():
            yield from path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)


def build_tokenizer(out: Path) -> object:
    """Train a byte-level BPE on ``corpus()`` and save it, with the chat template, in ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
    )
    fast.save_pretrained(out)
    return fast


def build(kind: str, out: Path) -> None:
    """Write the ``kind`` model (``chat`` or ``embed``) with its tokenizer into ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    tokenizer = build_tokenizer(out)
    shapes = SHAPES[kind]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        head_dim=64,
        num_key_value_heads=shapes["num_attention_heads"],
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        dtype="bfloat16",
        **shapes,
    )
    # vLLM serves bfloat16 on this CPU anyway (it downcasts float32 weights, with a warning per tensor).
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    if kind == "embed":
        # The Sentence Transformers layout: vLLM reads modules.json and serves the model for pooling.
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]
        (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
        (out / "1_Pooling").mkdir()
        pooling = {"word_embedding_dimension": shapes["hidden_size"], "pooling_mode_mean_tokens": True}
        (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
        (out / "2_Normalize").mkdir()


def ensure(kind: str, root: Path) -> Path:
    """The directory of the ``kind`` model under ``root``, built first if absent."""
    final = root / f"tiny-llama-{kind}-{recipe_hash()}"
    if (final / ".complete").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        build(kind, tmp)
        (tmp / ".complete").write_text(json.dumps({"kind": kind, "seed": SEED, "shapes": SHAPES[kind]}) + "\n")
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same build first
            if not (final / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(os.environ.get("ROUTERPANEL_REALENGINES_MODELS", DEFAULT_DIR)),
        help="where models are cached (default: $ROUTERPANEL_REALENGINES_MODELS or var/realengines/models)",
    )
    parser.add_argument("kinds", nargs="*", metavar="KIND", help="chat, embed (default: both)")
    args = parser.parse_args(argv)
    kinds = args.kinds or ["chat", "embed"]
    if unknown := set(kinds) - {"chat", "embed"}:
        parser.error(f"unknown kind(s): {', '.join(sorted(unknown))}")
    json.dump({kind: str(ensure(kind, args.dir.resolve())) for kind in kinds}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
