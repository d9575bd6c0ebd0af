"""SentencePiece training, the chat template and the assistant-only loss mask."""

import numpy as np
import pytest

from earthgpt_jax.data.tokenizer import (USER_TEMPLATE, encode_conversation, encode_prompt,
                                         train_tokenizer)

CORPUS = ["What is the category of this remote sensing image?", "forest", "sea",
          "There are <p>2 ships</p>[0.12,0.34,0.20,0.41;0.50,0.50,0.55,0.56]",
          "A dense green forest with two red vehicles.", USER_TEMPLATE] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(CORPUS, str(tmp_path_factory.mktemp("tok") / "t.model"), 320)


def _turns(*pairs):
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


def test_byte_fallback_and_special_ids(tok):
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    # Characters never seen in training still round-trip through byte pieces.
    assert tok.decode(tok.encode("Zürich ✓")) == "Zürich ✓"


def test_loss_mask_covers_exactly_the_answers_and_their_eos(tok):
    conv = _turns(("Is there a ship?", "yes"), ("How many ships?", "2"))
    enc = encode_conversation(tok, conv, 256)
    n = int(enc.valid.sum())
    ids, mask = enc.tokens[:n], enc.loss_mask[:n]
    p1 = encode_prompt(tok, "Is there a ship?")
    a1 = tok.encode("yes") + [tok.eos_id]
    p2 = encode_prompt(tok, "How many ships?")
    a2 = tok.encode("2") + [tok.eos_id]
    assert list(ids) == p1 + a1 + p2 + a2
    assert list(mask) == [0] * len(p1) + [1] * len(a1) + [0] * len(p2) + [1] * len(a2)
    assert tok.decode(ids[mask > 0]) == "yes"  # decode stops at the first </s>
    assert not enc.truncated and not enc.valid[n:].any() and not enc.loss_mask[n:].any()


def test_truncation_stops_at_a_turn_boundary(tok):
    conv = _turns(("Is there a ship?", "yes"), ("How many ships?", "2"))
    first = encode_conversation(tok, conv[:2], 256)
    enc = encode_conversation(tok, conv, int(first.valid.sum()) + 3)
    assert enc.truncated
    np.testing.assert_array_equal(enc.tokens[:int(first.valid.sum())],
                                  first.tokens[:int(first.valid.sum())])
    assert enc.valid.sum() == first.valid.sum()


def test_bad_conversations_are_refused(tok):
    with pytest.raises(ValueError, match="odd number"):
        encode_conversation(tok, [{"from": "human", "value": "hi"}], 16)
    with pytest.raises(ValueError, match="human/gpt"):
        encode_conversation(tok, [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}],
                            16)
