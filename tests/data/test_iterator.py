"""Packing, bucketing, deterministic resumable shuffling and per-process slices of the batches."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from slim_jax.data import (
    BatchIterator,
    ByteTokenizer,
    CausalLayout,
    EncoderDecoderLayout,
    Example,
    tokenize_examples,
)
from slim_jax.errors import ConfigError, DataError

TOK = ByteTokenizer()
LENGTHS = (16, 32, 64)


def make_examples(n: int, seed: int = 0) -> list[Example]:
    """Examples of varied lengths whose prompts name them: `#<i>:`."""
    rng = random.Random(seed)
    return [Example(f"#{i}:" + "p" * rng.randrange(0, 20), "r" * rng.randrange(0, 12))
            for i in range(n)]


def causal_data(n: int = 37):
    layout = CausalLayout(TOK, lengths=LENGTHS)
    return layout, tokenize_examples(make_examples(n), layout)


def segments(batch) -> list[tuple[int, int, str]]:
    """(row, segment id, decoded segment text) of every example in a causal batch."""
    found = []
    for r, row in enumerate(batch["segment_ids"]):
        for s in sorted(set(row.tolist()) - {0}):
            found.append((r, s, TOK.decode(batch["tokens"][r][row == s])))
    return found


def ids_of(batch) -> list[int]:
    return [int(text.split(":")[0][1:]) for _, _, text in segments(batch)]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_packing_keeps_segments_separate_with_restarting_positions():
    layout, data = causal_data()
    batch = next(BatchIterator(data, layout, global_batch_size=4, seed=0, pack=True))
    assert any(len(set(row.tolist()) - {0}) > 1 for row in batch["segment_ids"])  # really packed
    for r, row in enumerate(batch["segment_ids"]):
        used = row[row > 0]
        # Segments are contiguous, numbered 1, 2, ... from the left, padding (0) only at the end.
        assert used.tolist() == sorted(used.tolist()) and (row[len(used):] == 0).all()
        assert set(used.tolist()) == set(range(1, used.max() + 1))
        for s in set(used.tolist()):
            seg = row == s
            i = int(TOK.decode(batch["tokens"][r][seg]).split(":")[0][1:])
            ex = data[i]
            seq = np.concatenate([ex.prompt, ex.response])
            assert batch["positions"][r][seg].tolist() == list(range(len(seq) - 1))
            assert batch["tokens"][r][seg].tolist() == seq[:-1].tolist()
            # Each segment's last target is its own EOS: no target crosses into the next segment.
            assert batch["targets"][r][seg].tolist() == seq[1:].tolist()
            mask = batch["target_mask"][r][seg]
            assert batch["targets"][r][seg][mask == 1].tolist() == ex.response.tolist()


def test_encdec_packing_pairs_encoder_and_decoder_segments():
    layout = EncoderDecoderLayout(TOK, enc_lengths=(32, 64), dec_lengths=(16, 32))
    examples = make_examples(20)
    data = tokenize_examples(examples, layout)
    batch = next(BatchIterator(data, layout, global_batch_size=2, seed=3, pack=True))
    for r in range(2):
        for s in set(batch["enc_segment_ids"][r].tolist()) - {0}:
            prompt = TOK.decode(batch["enc_tokens"][r][batch["enc_segment_ids"][r] == s])
            i = int(prompt.split(":")[0][1:])
            dec = batch["dec_segment_ids"][r] == s
            assert batch["targets"][r][dec].tolist() == data[i].response.tolist()
            assert batch["dec_tokens"][r][dec][0] == TOK.pad_id
            assert batch["target_mask"][r][dec].all()


@pytest.mark.parametrize("pack", [False, True])
def test_bucketing_produces_only_configured_lengths(pack):
    layout, data = causal_data(60)
    it = BatchIterator(data, layout, global_batch_size=3, seed=1, pack=pack)
    seen = set()
    for batch in take(it, 40):
        length = batch["tokens"].shape[1]
        assert length in LENGTHS
        fill = int((batch["segment_ids"] > 0).sum(axis=1).max())
        assert length == min(x for x in LENGTHS if x >= fill)  # the smallest that holds the batch
        seen.add(length)
    assert pack or len(seen) > 1  # unpacked batches of short examples take the shorter lengths


def test_epoch_visits_every_example_once():
    layout, data = causal_data(37)
    it = BatchIterator(data, layout, global_batch_size=5, seed=4, drop_remainder=False,
                       num_epochs=1)
    batches = list(it)
    assert len(batches) == 8 == it.batches_per_epoch(0)
    visited = [i for b in batches for i in ids_of(b)]
    assert sorted(visited) == list(range(37))
    last = batches[-1]  # 37 = 7 * 5 + 2: three empty rows, never scored
    assert last["target_mask"][2:].sum() == 0 and (last["segment_ids"][2:] == 0).all()


def test_shuffling_is_deterministic_and_seeded():
    layout, data = causal_data()
    run = lambda seed: [ids_of(b) for b in take(BatchIterator(data, layout, global_batch_size=4,
                                                              seed=seed), 20)]
    assert run(7) == run(7)
    assert run(7) != run(8)
    # Epochs are reshuffled: epoch 0 and epoch 1 (9 batches of 4 each) visit different orders.
    stream = [i for batch in run(7) for i in batch]
    assert len(set(stream[:36])) == len(set(stream[36:72])) == 36
    assert stream[:36] != stream[36:72]


@pytest.mark.parametrize("pack", [False, True])
def test_resume_from_saved_position_continues_the_same_stream(pack):
    layout, data = causal_data()
    kwargs = dict(global_batch_size=4, seed=11, pack=pack)
    reference = take(BatchIterator(data, layout, **kwargs), 25)  # crosses epoch boundaries

    first = BatchIterator(data, layout, **kwargs)
    take(first, 13)
    saved = json.loads(json.dumps(first.state()))  # as a checkpoint would store it
    resumed = BatchIterator(data, layout, **kwargs)
    resumed.restore(saved)
    assert_same_batches(take(resumed, 12), reference[13:])
    assert first.state() == saved and resumed.state() != saved


@pytest.mark.parametrize("pack", [False, True])
def test_process_slices_partition_the_global_batch(pack):
    layout, data = causal_data()
    kwargs = dict(global_batch_size=8, seed=5, pack=pack)
    whole = take(BatchIterator(data, layout, **kwargs), 12)
    parts = [take(BatchIterator(data, layout, process_index=p, process_count=4, **kwargs), 12)
             for p in range(4)]
    for step, batch in enumerate(whole):
        for key, value in batch.items():
            local = [parts[p][step][key] for p in range(4)]
            assert all(x.shape == (2, value.shape[1]) for x in local)
            np.testing.assert_array_equal(np.concatenate(local), value, err_msg=key)


def test_bad_configurations_are_named():
    layout, data = causal_data(10)
    with pytest.raises(ConfigError, match="global batch of 6 rows does not divide over 4 "):
        BatchIterator(data, layout, global_batch_size=6, process_count=4)
    with pytest.raises(ConfigError, match="process_index must be in"):
        BatchIterator(data, layout, global_batch_size=4, process_index=2, process_count=2)
    with pytest.raises(DataError, match="10 examples are fewer than one global batch of 16"):
        BatchIterator(data, layout, global_batch_size=16)
    with pytest.raises(DataError, match="packs into fewer than 16 rows"):
        next(BatchIterator(data, layout, global_batch_size=16, pack=True))
    it = BatchIterator(data, layout, global_batch_size=2, seed=1)
    with pytest.raises(DataError, match="saved for seed 1 over 10 examples, this iterator has "
                                        "seed 2"):
        BatchIterator(data, layout, global_batch_size=2, seed=2).restore(it.state())
    with pytest.raises(DataError, match="lacks \\['index'"):
        it.restore({"epoch": 0})
    small = CausalLayout(TOK, lengths=8)  # the examples were fitted to 64 positions, not 8
    with pytest.raises(DataError, match=r"example \d+ takes .* the layout allows 1 to \(8,\)"):
        BatchIterator(data, small, global_batch_size=2)
