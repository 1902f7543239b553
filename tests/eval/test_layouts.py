"""Evaluation scores decoder-only models; an encoder-decoder is refused in one clear line at
every entry point rather than scored wrongly."""

from __future__ import annotations

import pytest
from flax import nnx

from slim_jax.data import ByteTokenizer, CausalLayout
from slim_jax.errors import ConfigError
from slim_jax.eval.downstream import generate_texts
from slim_jax.eval.general import sample_stories, story_reference
from slim_jax.eval.scoring import sequence_log_likelihoods
from slim_jax.models.t5 import T5, T5Config


@pytest.fixture(scope="module")
def t5():
    return T5(T5Config(vocab_size=ByteTokenizer.vocab_size, d_model=8, d_kv=4, d_ff=8,
                       num_layers=1, num_decoder_layers=1, num_heads=2), rngs=nnx.Rngs(0))


def test_every_entry_point_refuses_an_encoder_decoder(t5):
    tok = ByteTokenizer()
    layout = CausalLayout(tok, lengths=(16,))
    calls = {
        "sequence_log_likelihoods": lambda: sequence_log_likelihoods(
            t5, [layout.encode("Q:", "a")], layout),
        "generate_texts": lambda: generate_texts(t5, tok, ["Q:"], max_new_tokens=2,
                                                 max_prompt_tokens=8),
        "sample_stories": lambda: sample_stories(t5, tok, num_stories=1, max_new_tokens=8,
                                                 seed=0),
        "story_reference": lambda: story_reference(t5, tok, [[1, 70, 71]], max_length=8),
    }
    for name, call in calls.items():
        with pytest.raises(ConfigError, match=f"{name} scores decoder-only \\(causal\\) models; "
                                              "this T5 is an encoder_decoder model"):
            call()
