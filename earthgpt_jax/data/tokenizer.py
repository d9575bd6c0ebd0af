"""SentencePiece tokenizer, the chat template and the assistant-only loss mask.

Chat template (one record, any number of turns):

    <s> [visual tokens] USER: {question} ASSISTANT: {answer}</s> USER: {question} ASSISTANT: ...

The `<s>` and the visual tokens are placed by the model; this module produces the text tokens
after them. Each user part ("USER: {q} ASSISTANT:") and each answer (" {a}" + `</s>`) is encoded
separately, so a prompt at inference is tokenised exactly as it was in training. Loss is taken
only on answer tokens and their `</s>`.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Iterable, Sequence

import numpy as np

USER_TEMPLATE = "USER: {question} ASSISTANT:"

# Token id of a visual-token position in a packed row (earthgpt_jax/data/packing.py writes it,
# EarthGPT.packed_logits fills it with the image's token). Negative: no vocabulary id collides.
# sentencepiece is imported where it is used, so this constant loads without it (the GPU
# benchmark's bare images lack it).
IMAGE_TOKEN = -1


class Tokenizer:
    """A thin wrapper over a SentencePiece model file (LLaMA-2's kind: BPE with byte fallback)."""

    def __init__(self, model_path: str):
        if not os.path.exists(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        import sentencepiece as spm

        self.path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        # LLaMA's model has no pad piece; padding is masked out anyway, so 0 (<unk>) is fine.
        self.pad_id = max(self.sp.pad_id(), 0)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.sp.decode(ids).strip()


def train_tokenizer(texts: Iterable[str], out_path: str, vocab_size: int = 512) -> Tokenizer:
    """Trains a LLaMA-2-style BPE model (byte fallback, split digits) on `texts`."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, split_digits=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        add_dummy_prefix=True, normalization_rule_name="identity", num_threads=1,
        minloglevel=2)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, out_path)  # a crash mid-write never leaves a half model behind
    return Tokenizer(out_path)


@dataclasses.dataclass
class EncodedConversation:
    tokens: np.ndarray      # int32 [max_len], padded
    valid: np.ndarray       # bool  [max_len], False on padding
    loss_mask: np.ndarray   # float32 [max_len], 1 on answer tokens and their </s>
    truncated: bool


def encode_prompt(tok: Tokenizer, question: str) -> list[int]:
    return tok.encode(USER_TEMPLATE.format(question=question.strip()))


def encode_answer(tok: Tokenizer, answer: str) -> list[int]:
    return tok.encode(answer.strip()) + [tok.eos_id]


def encode_dialogue_prompt(tok: Tokenizer, history: Sequence[tuple[str, str]], question: str
                           ) -> list[int]:
    """Prompt for the next answer after earlier (question, answer) turns, laid out exactly as
    `encode_conversation` lays out training text."""
    ids: list[int] = []
    for q, a in history:
        ids += encode_prompt(tok, q) + encode_answer(tok, a)
    return ids + encode_prompt(tok, question)


def encode_conversation(tok: Tokenizer, conversations: Sequence[dict], max_len: int
                        ) -> EncodedConversation:
    """Text tokens of a human/gpt conversation with the assistant-only loss mask. A
    conversation longer than `max_len` is cut at a turn boundary where possible (and flagged),
    so the model never learns from a half answer that lacks its `</s>`."""
    if len(conversations) % 2:
        raise ValueError(f"conversation has an odd number of turns ({len(conversations)})")
    ids: list[int] = []
    mask: list[float] = []
    truncated = False
    for i in range(0, len(conversations), 2):
        human, gpt = conversations[i], conversations[i + 1]
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise ValueError(f"turns {i}, {i + 1} are not a human/gpt pair")
        prompt = encode_prompt(tok, human["value"])
        answer = encode_answer(tok, gpt["value"])
        if len(ids) + len(prompt) + len(answer) > max_len:
            truncated = True
            if ids:
                break
            answer = answer[:max(max_len - len(prompt), 0)]
        ids += prompt + answer
        mask += [0.0] * len(prompt) + [1.0] * len(answer)
    ids, mask = ids[:max_len], mask[:max_len]
    pad = max_len - len(ids)
    return EncodedConversation(np.asarray(ids + [tok.pad_id] * pad, np.int32),
                               np.arange(max_len) < len(ids),
                               np.asarray(mask + [0.0] * pad, np.float32), truncated)
