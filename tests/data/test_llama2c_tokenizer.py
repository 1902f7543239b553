"""The pipeline with the real TinyStories tokenizer on a real T0 classification task."""

from __future__ import annotations

import numpy as np
import pytest

from slim_jax.data import BatchIterator, CausalLayout, load_t0_task, tokenize_examples


@pytest.fixture(scope="module")
def tokenizer(shared_data):
    from slim_jax.models.llama2c import Llama2cTokenizer

    return Llama2cTokenizer.from_file(shared_data / "tinystories260k" / "tokenizer.bin")


def test_t0_task_batches_score_exactly_the_label(tokenizer, shared_data):
    task = load_t0_task("amazon_polarity_Is_this_review", shared_data)
    layout = CausalLayout(tokenizer, lengths=(128, 256))
    data = tokenize_examples(task.train, layout)
    # Reviews run to ~700 tokens: truncation keeps BOS, the end of the prompt and the whole label.
    assert max(layout.size(ex)[0] for ex in data) == 256
    for ex, example in zip(data, task.train, strict=True):
        assert ex.prompt[0] == tokenizer.bos_id and ex.response[-1] == tokenizer.eos_id
        assert tokenizer.decode(ex.response) == example.answer
        assert tokenizer.decode(ex.prompt).endswith("Is the review positive or negative?\n")
    batch = next(BatchIterator(data, layout, global_batch_size=8, seed=0))
    for row in range(8):
        mask = batch["target_mask"][row] == 1
        scored = batch["targets"][row][mask]
        assert scored[-1] == tokenizer.eos_id
        assert tokenizer.decode(scored) in task.labels
        # Unscored positions are the prompt and the padding.
        assert np.all(batch["target_mask"][row][batch["segment_ids"][row] == 0] == 0)
