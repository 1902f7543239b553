"""Config validation names the offending field; every SLIM ablation is a config."""

from __future__ import annotations

import dataclasses

import pytest

from slim_jax.errors import ConfigError
from slim_jax.nn import LoRAConfig, SlimConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 11}, r"top_k must be between 1 and .* experts: 10\), got 11"),
        ({"top_k": 0}, "top_k"),
        ({"dropmerge_p": 1.0}, r"dropmerge_p must be in \[0, 1\)"),
        ({"dropmerge_p": -0.2}, "dropmerge_p"),
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"num_lora_experts": 0}, "num_lora_experts"),
        ({"num_identity_experts": 0}, "num_identity_experts must be >= 1 while yielding is on"),
        ({"momentum": 1.2}, "momentum"),
        ({"yield_threshold": -0.5}, "yield_threshold must be a finite number >= 0"),
        ({"yield_threshold": float("inf")}, "yield_threshold"),
        ({"yield_threshold": float("nan")}, "yield_threshold"),
        ({"yield_quantile": 1.0}, r"yield_quantile must be None .* or in \(0, 1\)"),
        ({"yield_quantile": 0.0}, "yield_quantile"),
        ({"num_clusters": 0}, "num_clusters"),
        ({"init_a": "xavier"}, "init_a"),
        ({"param_dtype": "int8"}, "param_dtype"),
        ({"alpha": 0}, "alpha"),
    ],
)
def test_slim_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SlimConfig(**kwargs)


def test_lora_config_errors_and_scale():
    with pytest.raises(ConfigError, match="dropout"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="rank"):
        LoRAConfig(rank=-1)
    assert LoRAConfig(rank=16, alpha=32).scale == 2.0
    assert LoRAConfig(rank=16, alpha=32, rslora=True).scale == 8.0


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SlimConfig().top_k = 3  # type: ignore[misc]


def test_every_ablation_is_a_valid_config():
    assert SlimConfig(num_identity_experts=0, yielding=False).num_experts == 8
    assert not SlimConfig(yielding=False).yielding
    assert SlimConfig(dense_routing=True, top_k=2).dense_routing
    plain = SlimConfig(num_lora_experts=1, num_identity_experts=0, top_k=1, yielding=False)
    assert not plain.has_router
    assert SlimConfig(dropmerge_p=0.3).dropmerge_p == 0.3
