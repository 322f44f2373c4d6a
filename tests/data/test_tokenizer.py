"""ByteTokenizer: exact round trip of any text, and usable as Megatron's dataset tokenizer."""

import json

import numpy
import pytest

from megatron_fapool.data import BYTE_VOCAB_SIZE, EOD_ID, ByteTokenizer

TEXTS = [
    "",
    "def f(x):\n    return x + 1\n",
    "naïve café — Ünïcödé, 中文字符, русский, emoji 🐍🚀, tab\there, NUL \x00 end",
    "\r\n mixed \r line \n endings\n",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.tokenize(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.detokenize(ids) == text
    assert tok.tokenize_array(text).dtype == numpy.uint16
    assert tok.tokenize_array(text).tolist() == ids


def test_special_ids_and_vocab():
    tok = ByteTokenizer()
    assert tok.eod == EOD_ID == 256
    assert tok.vocab_size == BYTE_VOCAB_SIZE == 257
    assert len(tok.vocab) == 257 and tok.vocab["<eod>"] == 256 and tok.inv_vocab[65] == "<0x41>"
    # a multi-byte character is several ids
    assert tok.tokenize("é") == [0xC3, 0xA9]


def test_detokenize_drops_eod_and_replaces_invalid_utf8():
    tok = ByteTokenizer()
    ids = tok.tokenize("ab") + [tok.eod] + tok.tokenize("cé") + [tok.eod]
    assert tok.detokenize(ids) == "abcé"
    assert tok.detokenize(numpy.array(ids, dtype=numpy.uint16)) == "abcé"
    assert tok.detokenize([0xFF, 0x41]) == "\ufffdA"
    assert tok.detokenize(tok.tokenize("é")[:1]) == "\ufffd"  # a cut multi-byte character
    with pytest.raises(ValueError):
        tok.detokenize([300])


def test_megatron_gpt_config_and_mock_dataset_accept_it():
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset

    tok = ByteTokenizer()
    config = GPTDatasetConfig(
        random_seed=3, sequence_length=16, tokenizer=tok, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
    )
    assert config.token_dtype_code == 8  # uint16 tokens for a 257-id vocabulary
    train, _, _ = BlendedMegatronDatasetBuilder(MockGPTDataset, [4, None, None], lambda: True, config).build()
    sample = train[0]
    assert sample["tokens"].shape == (16,)
    assert int(sample["tokens"].max()) < tok.vocab_size
    # the unique identifiers (part of Megatron's index-cache hash) are stable and JSON-serialisable
    assert json.loads(json.dumps(tok.unique_identifiers)) == json.loads(ByteTokenizer().unique_description)
