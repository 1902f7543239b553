"""T0 template files as classification tasks: label sets, deterministic stratified splits."""

from __future__ import annotations

import pytest

from slim_jax.data import classification_candidates, label_stats, load_t0_task, load_t0_template
from slim_jax.errors import DataError


def test_amazon_polarity_task(shared_data):
    task = load_t0_task("amazon_polarity_Is_this_review", shared_data)
    assert task.labels == ("Negative", "Positive")
    assert task.label_counts("all") == {"Negative": 89, "Positive": 111}
    assert (len(task.train), len(task.test)) == (150, 50)
    # Stratified: each label keeps its share in the test set.
    assert task.label_counts("test") == {"Negative": 22, "Positive": 28}
    assert task.majority_accuracy() == pytest.approx(28 / 50)
    assert not {e.instruction for e in task.train} & {e.instruction for e in task.test}
    assert all(e.response == e.answer and e.answer in task.labels for e in task.train)


def test_split_is_deterministic_and_seeded(shared_data):
    a = load_t0_task("ag_news_classify", shared_data, seed=3)
    b = load_t0_task("ag_news_classify", shared_data, seed=3)
    c = load_t0_task("ag_news_classify", shared_data, seed=4)
    assert a.test == b.test and a.train == b.train
    assert a.test != c.test
    assert len(a.train) + len(a.test) == 200


def test_unlearnable_templates_are_refused(shared_data):
    with pytest.raises(DataError, match="single label 'positive' for all 200 examples"):
        load_t0_task("rotten_tomatoes_Movie_Expressed_Sentiment", shared_data)
    with pytest.raises(DataError, match="distinct completions, more than max_classes=20"):
        load_t0_task("samsum_Summarize_", shared_data)


def test_candidates_have_several_labels(shared_data):
    candidates = {s.name: s for s in classification_candidates(shared_data)}
    assert "amazon_polarity_Is_this_review" in candidates and "ag_news_classify" in candidates
    assert not any(n.startswith(("rotten_tomatoes", "imdb_", "dbpedia_14")) for n in candidates)
    yelp = candidates["yelp_review_full_format_star"]
    assert (yelp.num_classes, yelp.num_examples) == (5, 200)
    assert yelp.majority_share == pytest.approx(51 / 200)
    shares = [s.majority_share for s in candidates.values()]
    assert shares == sorted(shares)
    stats = label_stats(load_t0_template("ag_news_classify", shared_data))
    assert stats.counts == (("Science and technology", 122), ("Business", 78))
