"""Remote paths (issue 10): models, tokenizers, adapters and data sets read from `gs://` give what
the local files give. `gs://` is served by an in-memory fsspec file system registered for the
test (no network), holding copies of the real tiny files of the data folder."""

from __future__ import annotations

import json
import pathlib

import fsspec
import jax
import numpy as np
import pytest
from etils.epath import backend
from flax import nnx
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry as fsspec_registry

from slim_jax import paths
from slim_jax.data.bbh import load_bbh_task
from slim_jax.data.records import load_records
from slim_jax.data.sets import load_commonsense, load_gsm8k
from slim_jax.errors import CheckpointError, DataError
from slim_jax.hub import resolve_model_dir
from slim_jax.models.adapter_io import find_adapter
from slim_jax.models.llama import Llama
from slim_jax.models.loading import load_model
from slim_jax.parallel import MeshConfig, make_mesh
from slim_jax.paths import RemotePathError, as_path, local_copy
from slim_jax.settings import DATA_DIR_ENV, data_dir, locate

BUCKET = "gs://bucket"
DATA_FILES = ("tinystories260k/checkpoint_v1.bin", "tinystories260k/tokenizer.bin",
              "gsm8k/test.jsonl", "commonsense/ARC-Easy/test.json",
              "bbh/boolean_expressions.json", "bbh/cot-prompts/boolean_expressions.txt")


class FakeGCS(MemoryFileSystem):
    """`gs://bucket/key` kept in memory, named as gcsfs names it (`bucket/key`, no root)."""

    protocol = ("gs", "gcs")
    store: dict = {}  # noqa: RUF012 (fsspec's own class-level store, one per subclass)
    pseudo_dirs: list = [""]  # noqa: RUF012
    root_marker = ""

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.utils.stringify_path(path)
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix)
        return path.strip("/")


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """A fresh in-memory `gs://`, and a fresh local cache; both gone after the test."""
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    for name in FakeGCS.protocol:  # registered for this test only (monkeypatch restores)
        monkeypatch.setitem(fsspec_registry, name, FakeGCS)
    backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches the file system
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    yield fsspec.filesystem("gcs")
    backend.fsspec_backend._get_filesystem.cache_clear()
    FakeGCS.store.clear()


def _upload(fs, local: pathlib.Path, url: str) -> None:
    for file in sorted(local.rglob("*") if local.is_dir() else [local]):
        if file.is_file():
            relative = file.relative_to(local).as_posix() if local.is_dir() else ""
            fs.pipe(f"{url}/{relative}".rstrip("/"), file.read_bytes())


@pytest.fixture
def remote_data(gcs, shared_data):
    """Part of the data folder copied to gs://bucket/data."""
    for name in DATA_FILES:
        gcs.pipe(f"{BUCKET}/data/{name}", (shared_data / name).read_bytes())
    return f"{BUCKET}/data"


def _assert_same_weights(model, local_model) -> None:
    """Same config and bit-equal parameters (so equal logits)."""
    assert model.config == local_model.config
    remote, local = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (model, local_model))
    jax.tree.map(np.testing.assert_array_equal, remote, local)
    assert len(jax.tree.leaves(remote)) >= 9


def test_urls_stay_whole_through_every_function_that_joins_paths(gcs, monkeypatch):
    gcs.pipe(f"{BUCKET}/m/config.json", b"{}")
    folded = pathlib.Path(f"{BUCKET}/m")  # what pathlib makes of a URL: gs:/bucket/m
    assert str(folded) == "gs:/bucket/m"
    assert str(as_path(folded) / "config.json") == f"{BUCKET}/m/config.json"
    assert str(data_dir(folded, required="config.json")) == f"{BUCKET}/m"
    monkeypatch.setenv(DATA_DIR_ENV, f"{BUCKET}/m")
    assert locate("config.json") == f"{BUCKET}/m/config.json"
    assert locate(f"{BUCKET}/m") == f"{BUCKET}/m"
    cached = resolve_model_dir(folded)
    assert cached == paths.cache_dir() / "gs" / "bucket" / "m"  # never a local "gs:" folder
    assert (cached / "config.json").read_text() == "{}"


def test_missing_remote_files_are_one_line_naming_the_url(gcs):
    gcs.pipe(f"{BUCKET}/m/tokenizer.json", b"{}")
    cases = [
        (lambda: resolve_model_dir(f"{BUCKET}/none"), CheckpointError, "gs://bucket/none"),
        (lambda: resolve_model_dir(f"{BUCKET}/m"), CheckpointError,
         "model directory gs://bucket/m lacks config.json"),
        (lambda: load_model(f"{BUCKET}/none/model.bin"), CheckpointError,
         "gs://bucket/none/model.bin"),
        (lambda: data_dir(f"{BUCKET}/none"), DataError, "data folder gs://bucket/none does not"),
        (lambda: data_dir(f"{BUCKET}/m", required="gsm8k"), DataError,
         "data folder gs://bucket/m has no 'gsm8k'"),
        (lambda: load_records(f"{BUCKET}/m/a.jsonl"), DataError,
         "data file gs://bucket/m/a.jsonl does not exist"),
        (lambda: local_copy(f"{BUCKET}/none"), RemotePathError, "gs://bucket/none does not"),
        (lambda: as_path("ftp://host/x"), RemotePathError, "URL scheme ftp:// is not supported"),
        # no s3fs installed: the package to install is named
        (lambda: load_model("s3://bucket/m"), RemotePathError, "needs the package s3fs"),
        (lambda: locate("s3://bucket/m"), RemotePathError, "needs the package s3fs"),
    ]
    for call, error, text in cases:
        with pytest.raises(error) as info:
            call()
        assert text in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_llama2c_model_from_a_remote_data_folder(remote_data, shared_data, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, remote_data)
    where = locate("tinystories260k/checkpoint_v1.bin")
    assert where == f"{remote_data}/tinystories260k/checkpoint_v1.bin"
    model, tokenizer = load_model(where)
    local_model, local_tokenizer = load_model(shared_data / "tinystories260k/checkpoint_v1.bin")
    text = "Once upon a time"
    assert tokenizer.encode(text, add_bos=True) == local_tokenizer.encode(text, add_bos=True)
    _assert_same_weights(model, local_model)


def test_data_sets_from_a_remote_data_folder(remote_data, shared_data):
    assert str(data_dir(remote_data)) == remote_data
    assert load_gsm8k("test", remote_data) == load_gsm8k("test", shared_data)
    assert (load_commonsense("ARC-Easy", "test", remote_data)
            == load_commonsense("ARC-Easy", "test", shared_data))
    remote_bbh = load_bbh_task("boolean_expressions", remote_data)
    local_bbh = load_bbh_task("boolean_expressions", shared_data)
    assert remote_bbh.examples == local_bbh.examples
    assert remote_bbh.description == local_bbh.description
    records = load_records(f"{remote_data}/gsm8k/test.jsonl", ("question", "answer"))
    assert records.rows == load_records(shared_data / "gsm8k/test.jsonl").rows
    assert records.origin == f"{remote_data}/gsm8k/test.jsonl"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Hugging Face Llama (safetensors in two shards with their index) and its
    tokenizer, written without torch."""
    import safetensors.numpy
    import tokenizers
    import transformers

    d, f, v = 16, 32, 16
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
              "lm_head.weight": (v, d), "model.layers.0.input_layernorm.weight": (d,),
              "model.layers.0.post_attention_layernorm.weight": (d,)}
    for name, shape in (("q", (d, d)), ("k", (8, d)), ("v", (8, d)), ("o", (d, d))):
        shapes[f"model.layers.0.self_attn.{name}_proj.weight"] = shape
    for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
        shapes[f"model.layers.0.mlp.{name}_proj.weight"] = shape
    rng = np.random.default_rng(0)
    tensors = {k: rng.normal(0, 0.2, s).astype(np.float32) for k, s in shapes.items()}
    folder = tmp_path_factory.mktemp("hf")
    names = sorted(tensors)
    index = {}
    for i, part in enumerate((names[:6], names[6:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        safetensors.numpy.save_file({k: tensors[k] for k in part}, folder / file)
        index.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": v, "hidden_size": d, "intermediate_size": f,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "tie_word_embeddings": False, "eos_token_id": 2}))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "once": 4, "upon": 5, "a": 6, "time": 7}
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>").save_pretrained(folder)
    return folder


def test_hf_model_tokenizer_and_adapter_from_gcs(gcs, hf_dir, tmp_path):
    assert len(list(hf_dir.glob("*.safetensors"))) > 1  # a sharded checkpoint
    _upload(gcs, hf_dir, f"{BUCKET}/llama")
    model, tokenizer = load_model(f"{BUCKET}/llama")
    local_model, local_tokenizer = load_model(hf_dir)
    assert tokenizer.encode("once upon a time") == local_tokenizer.encode("once upon a time")
    _assert_same_weights(model, local_model)

    # Mesh-aware loading reads its slices from the local copy: each device holds its shard.
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1))
    sharded = Llama.from_pretrained(f"{BUCKET}/llama", mesh=mesh)
    kernel = sharded.layers[0].mlp.up_proj.kernel.get_value()  # [16, 32]: embed on fsdp (8)
    assert {s.data.shape for s in kernel.addressable_shards} == {(2, 32)}
    _assert_same_weights(sharded, local_model)

    # The copy is reused: a second load fetches nothing (the cache's files are not rewritten).
    cached = paths.cache_dir() / "gs" / "bucket" / "llama"
    stamps = {p.name: p.stat().st_mtime_ns for p in cached.iterdir()}
    assert resolve_model_dir(f"{BUCKET}/llama") == cached
    assert {p.name: p.stat().st_mtime_ns for p in cached.iterdir()} == stamps

    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    _upload(gcs, peft, f"{BUCKET}/adapter")
    source = find_adapter(f"{BUCKET}/adapter")
    assert source.format == "peft"
    assert (source.directory / "adapter_config.json").is_file()
