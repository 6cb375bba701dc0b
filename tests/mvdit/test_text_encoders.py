"""genvis.text: built-in offline encoders, HF folders, prompt encoding and errors."""

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from genvis.text import (
    TextEncoderNotFoundError,
    build_tiny_t5,
    encode_prompts,
    load_text_encoder,
    text_embed_dim,
)
from genvis.text.encoders import _minilm_path


def test_tiny_t5_is_seeded_frozen_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    tokenizer, encoder = load_text_encoder("tiny-t5")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert text_embed_dim(encoder) == 64 and not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    _, again = build_tiny_t5()
    for (name, a), b in zip(encoder.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    hidden, mask = encode_prompts(tokenizer, encoder, ["a red circle", "héllo 🙂", ""], max_length=16)
    assert hidden.shape == (3, 16, 64) and mask.dtype == torch.bool
    # byte-level: 12 bytes + </s>; "héllo 🙂" is 11 UTF-8 bytes + </s>; "" is just </s>
    assert mask.sum(1).tolist() == [13, 12, 1]


def test_truncation_and_single_prompt():
    tokenizer, encoder = load_text_encoder("tiny-t5")
    hidden, mask = encode_prompts(tokenizer, encoder, "x" * 100, max_length=8)
    assert hidden.shape == (1, 8, 64) and bool(mask.all())


def test_folder_round_trip(tmp_path):
    tokenizer, encoder = load_text_encoder("tiny-t5")
    tokenizer.save_pretrained(tmp_path)
    encoder.save_pretrained(tmp_path)
    tokenizer2, encoder2 = load_text_encoder(tmp_path)
    assert type(encoder2).__name__ == "T5EncoderModel"  # encoder-only class, not the full seq2seq model
    prompts = ["a blue square moves right to left"]
    torch.testing.assert_close(
        encode_prompts(tokenizer, encoder, prompts, 40)[0], encode_prompts(tokenizer2, encoder2, prompts, 40)[0]
    )


def test_any_hf_encoder_folder_through_automodel(tmp_path):
    # a tiny BERT with the real MiniLM tokenizer: AutoModelForTextEncoding has no BERT entry, AutoModel is used
    AutoTokenizer.from_pretrained(_minilm_path()).save_pretrained(tmp_path)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(tmp_path)
    tokenizer, encoder = load_text_encoder(str(tmp_path))
    hidden, mask = encode_prompts(tokenizer, encoder, ["a cat", "a kitten sleeps"], 10)
    assert hidden.shape == (2, 10, 32) and mask.sum(1).tolist() == [4, 5]


def test_default_is_the_real_minilm():
    tokenizer, encoder = load_text_encoder()
    assert type(encoder).__name__ == "BertModel" and text_embed_dim(encoder) == 384
    texts = ["a photo of a cat", "a picture of a kitten", "stock market crash"]
    hidden, mask = encode_prompts(tokenizer, encoder, texts, 16)
    # sentence-transformers pooling: masked mean, L2-normalised
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    assert pooled[0] @ pooled[1] > 0.6 > 0.2 > pooled[0] @ pooled[2]


def test_unknown_names_fail_fast_and_clearly(tmp_path):
    with pytest.raises(TextEncoderNotFoundError, match=r"'org/not-a-model'.*built-in encoder"):
        load_text_encoder("org/not-a-model")
    with pytest.raises(TextEncoderNotFoundError, match="empty-dir"):
        load_text_encoder(tmp_path / "empty-dir")


def test_encode_prompts_errors():
    tokenizer, encoder = load_text_encoder("tiny-t5")
    with pytest.raises(ValueError, match="prompts"):
        encode_prompts(tokenizer, encoder, [], 8)
    with pytest.raises(ValueError, match="prompts"):
        encode_prompts(tokenizer, encoder, [3], 8)
    with pytest.raises(ValueError, match="max_length"):
        encode_prompts(tokenizer, encoder, ["a"], 0)
