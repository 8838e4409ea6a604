"""The tiny model's tokenizer: every digit its own token, BPE pieces for the templated English.

Numbers are the hard part of arithmetic for a small model, so the pre-tokenizer isolates every digit
(``"128"`` is ``1``, ``2``, ``8``): the model sees place values one at a time, and adding two numbers is
a digit-by-digit recurrence it can learn. The text between digits is one piece, spaces and punctuation
included, so BPE learns whole words and frequent phrases of the prompt templates (``" + "``,
``" apples. He buys "``, ``"Answer: "``) and the debate prompts stay short. The alphabet is printable
ASCII plus newline, so any ASCII text round-trips exactly; anything else becomes ``<unk>``.

Special tokens (ids 0..3): ``<|endoftext|>`` (bos and pad), ``<|im_start|>``, ``<|im_end|>`` (eos: it ends
every assistant turn) and ``<unk>``. The chat template is ChatML::

    <|im_start|>user
    {question}<|im_end|>
    <|im_start|>assistant
    {answer}<|im_end|>
"""
from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

BOS, EOS, PAD, UNK = "<|endoftext|>", "<|im_end|>", "<|endoftext|>", "<unk>"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ALPHABET = sorted(set(string.digits + string.ascii_letters + string.punctuation + " \n"))
DEFAULT_VOCAB_SIZE = 384


def build_tokenizer(corpus: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train the BPE merges on ``corpus`` (texts) and return a ``PreTrainedTokenizerFast`` with the
    chat template and special tokens set; ``save_pretrained(dir)`` writes ``tokenizer.json`` and
    ``tokenizer_config.json``, which ``transformers.AutoTokenizer`` loads back."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    min_size = len(SPECIAL_TOKENS) + len(ALPHABET)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (special tokens + alphabet), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Each digit is a piece of its own; everything between two digits is one piece. No normaliser and
    # a decoder that concatenates: decode(encode(text)) == text for any text over the alphabet.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[0-9]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=ALPHABET, limit_alphabet=len(ALPHABET),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, model_max_length=4096)


def tokenizer_files(tokenizer) -> dict[str, str]:
    """``{"tokenizer.json": ..., "tokenizer_config.json": ...}``: the files that make a checkpoint's
    tokenizer, written out explicitly (chat template inside ``tokenizer_config.json``, the generic
    ``PreTrainedTokenizerFast`` class) so that transformers 4 and 5 both load them."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
        "additional_special_tokens": ["<|im_start|>"],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": tokenizer.model_max_length,
    }
    return {"tokenizer.json": tokenizer.backend_tokenizer.to_str(pretty=True) + "\n",
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}


def load_tokenizer(path: str | Path):
    """The saved tokenizer at ``path`` (a folder with ``tokenizer.json``), via ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
