"""Module library: checks naming the odd module, stacking, attaching, PEFT round trip."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slim_jax.lorahub import (
    LibraryError,
    LoRAModule,
    ModuleLibrary,
    load_module,
    module_from_model,
)
from slim_jax.nn import LoRAConfig, LoRALinear, adapted_layers, inject
from tests.lorahub.conftest import (
    LLAMA_TARGETS,
    T5_TARGETS,
    random_modules,
    target_layers,
    tiny_llama,
    tiny_t5,
)


@pytest.fixture(scope="module")
def modules():
    return random_modules(target_layers(tiny_llama(), LLAMA_TARGETS), 3)


def test_stacking_keeps_module_order(modules):
    lib = ModuleLibrary.from_modules(modules)
    path = lib.paths[0]
    assert lib.names == ("m0", "m1", "m2")
    assert lib.a[path].shape == (3, 16, 2)
    for i, m in enumerate(modules):
        np.testing.assert_array_equal(np.asarray(lib.a[path][i]), m.factors[path][0])
        np.testing.assert_array_equal(np.asarray(lib.b[path][i]), m.factors[path][1])
    again = lib.module("m1")
    np.testing.assert_array_equal(again.factors[path][1], modules[1].factors[path][1])


def test_different_rank_names_the_module(modules):
    odd = random_modules(target_layers(tiny_llama(), LLAMA_TARGETS), 1, rank=4, alpha=8.0)[0]
    odd = dataclasses.replace(odd, name="odd")
    with pytest.raises(LibraryError, match="module 'odd' has rank 4, module 'm0' has rank 2"):
        ModuleLibrary.from_modules([*modules, odd])


def test_different_targets_name_the_module_and_layers(modules):
    other = random_modules(target_layers(tiny_llama(), ("self_attn/q_proj", "self_attn/k_proj")),
                           1)[0]
    other = dataclasses.replace(other, name="kq")
    with pytest.raises(LibraryError, match=r"module 'kq' adapts other layers.*k_proj"):
        ModuleLibrary.from_modules([modules[0], other])


def test_different_shape_names_the_layer(modules):
    path = sorted(modules[0].factors)[1]
    factors = dict(modules[1].factors)
    factors[path] = (factors[path][0], np.zeros((2, 5), np.float32))
    odd = dataclasses.replace(modules[1], name="wide", factors=factors)
    with pytest.raises(LibraryError, match=f"module 'wide' has B of shape \\(2, 5\\) at layer "
                                           f"{path}"):
        ModuleLibrary.from_modules([modules[0], odd])


def test_different_scale_and_duplicate_names(modules):
    odd = dataclasses.replace(modules[1], alpha=16.0, name="loud")
    with pytest.raises(LibraryError, match=r"module 'loud' has LoRA scale 8\.0"):
        ModuleLibrary.from_modules([modules[0], odd])
    with pytest.raises(LibraryError, match="repeated: \\['m0'\\]"):
        ModuleLibrary.from_modules([modules[0], modules[0]])
    with pytest.raises(LibraryError, match="at least one module"):
        ModuleLibrary.from_modules([])


def test_attach_puts_lora_on_exactly_the_library_layers(modules):
    model = tiny_llama()
    attached = ModuleLibrary.from_modules(modules).attach(model)
    assert list(adapted_layers(model)) == sorted(modules[0].factors)
    composed = attached.composed(jnp.array([1.0, 0.0, 0.0]))
    rebuilt = nnx.merge(attached.graphdef, composed, attached.rest)
    layer = rebuilt.layers[1].self_attn.v_proj
    np.testing.assert_allclose(np.asarray(layer.lora_a[...]),
                               modules[0].factors["layers/1/self_attn/v_proj"][0])


def test_merged_model_leaves_the_base_untouched(modules):
    model = tiny_llama()
    attached = ModuleLibrary.from_modules(modules).attach(model)
    tokens = jnp.arange(1, 9)[None]
    before = np.asarray(model(tokens))
    w = jnp.array([0.5, -1.0, 0.25])
    merged = attached.merged_model(w)
    np.testing.assert_allclose(np.asarray(merged(tokens)), np.asarray(attached.model(w)(tokens)),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(model(tokens)), before)
    assert not np.allclose(np.asarray(merged(tokens)), before)


def test_attach_refuses_layers_the_model_lacks_and_foreign_adapters(modules):
    t5_modules = random_modules(target_layers(tiny_t5(), T5_TARGETS), 2)
    with pytest.raises(LibraryError, match="layers the model does not have"):
        ModuleLibrary.from_modules(t5_modules).attach(tiny_llama())
    model = tiny_llama()
    inject(model, "k_proj", LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    with pytest.raises(LibraryError, match="already carries adapters"):
        ModuleLibrary.from_modules(modules).attach(model)


def test_module_from_model_and_peft_round_trip(tmp_path, modules):
    from slim_jax.models.peft_io import save_peft

    model = tiny_llama()
    lib = ModuleLibrary.from_modules(modules)
    inject(model, "^(?:" + "|".join(lib.paths) + ")$", lib.lora_config, rngs=nnx.Rngs(0))
    nnx.update(model, lib.attach(model).composed(jnp.array([0.0, 1.0, 0.0])))
    taken = module_from_model(model, "m1")
    save_peft(model, tmp_path / "m1", base_model_name_or_path="tiny")
    loaded = load_module(tmp_path / "m1", tiny_llama())
    assert (loaded.name, loaded.rank, loaded.alpha) == ("m1", 2, 4.0)
    for path, (a, b) in modules[1].factors.items():
        np.testing.assert_allclose(taken.factors[path][0], a, rtol=1e-6)
        np.testing.assert_allclose(loaded.factors[path][0], a, rtol=1e-6)
        np.testing.assert_allclose(loaded.factors[path][1], b, rtol=1e-6)


def test_module_from_model_refuses_mixed_ranks():
    model = tiny_llama()
    inject(model, "q_proj", LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    inject(model, "v_proj", LoRAConfig(rank=4), rngs=nnx.Rngs(0))
    assert all(isinstance(m, LoRALinear) for m in adapted_layers(model).values())
    with pytest.raises(LibraryError, match="LoRA layers differ"):
        module_from_model(model, "mixed")
    with pytest.raises(LibraryError, match="no LoRALinear"):
        module_from_model(tiny_llama(), "none")


def test_lora_module_scale():
    module = LoRAModule("x", 4, 8.0, {}, rslora=True)
    assert module.scale == pytest.approx(4.0)


def test_find_module_looks_in_the_folder_by_id_last_part_and_task(tmp_path):
    from slim_jax.errors import CheckpointError
    from slim_jax.lorahub import find_module

    for name in ("lorahub/flan_t5_large-a", "flan_t5_large-b", "c"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "adapter_config.json").write_text("{}")
    for task in "abc":
        found = find_module(f"lorahub/flan_t5_large-{task}", tmp_path, hub=False)
        assert (found / "adapter_config.json").is_file() and found.name.endswith(task)
    with pytest.raises(CheckpointError, match="module 'lorahub/flan_t5_large-d' is not in"):
        find_module("lorahub/flan_t5_large-d", tmp_path, hub=False)
