"""The data pipeline: records -> examples -> token ids -> batches, and BIG-Bench Hard.

- `records`: local JSON/JSONL files or hub datasets, every record validated (file and line named).
- `examples`, `sets`, `t0_tasks`: `Example`s, prompt templates, the shared folder's sets, T0
  classification tasks.
- `layout`: tokenisation, truncation and the standard batch keys (causal LM, encoder-decoder).
- `packing`, `iterator`: bucketing, packing, deterministic resumable shuffling, per-process slices.
- `bbh`: BIG-Bench Hard prompts, ADAPT split and exact-match scoring; `t0_targets`: T0
  classification templates as LoRAHub targets with BBH's interface.

Knows nothing of models: it takes any `slim_jax.tokenizer.Tokenizer`.

>>> from slim_jax.data import ByteTokenizer, CausalLayout, BatchIterator, Example, tokenize_examples
>>> layout = CausalLayout(ByteTokenizer(), lengths=(32, 64))
>>> data = tokenize_examples([Example("2+2=", "4"), Example("1+1=", "2")], layout)
>>> batch = next(BatchIterator(data, layout, global_batch_size=1, pack=True))
>>> batch["tokens"].shape, batch["segment_ids"].max().item()
((1, 32), 2)
"""

from slim_jax.data.bbh import (
    ADAPT_K,
    ADAPT_SEED,
    BBHExample,
    BBHTask,
    adapt_indices,
    bbh_icl_prompt,
    bbh_prompt,
    exact_match,
    exact_match_score,
    load_bbh,
    load_bbh_task,
    normalize_answer,
)
from slim_jax.data.bbh_tasks import BBH_DESCRIPTIONS, BBH_TASKS
from slim_jax.data.byte_tokenizer import ByteTokenizer
from slim_jax.data.examples import ALPACA, PLAIN, Example, PromptTemplate
from slim_jax.data.iterator import BatchIterator, epoch_order
from slim_jax.data.layout import (
    CausalLayout,
    EncoderDecoderLayout,
    Layout,
    TokenizedExample,
    tokenize_examples,
)
from slim_jax.data.records import Records, load_records, read_hub, read_json, read_jsonl
from slim_jax.data.sets import (
    commonsense_names,
    gsm8k_final_answer,
    load_commonsense,
    load_gsm8k,
    load_t0_template,
    t0_template_names,
)
from slim_jax.data.t0_targets import T0Target, load_t0_target, t0_icl_prompt
from slim_jax.data.t0_tasks import (
    ClassificationTask,
    LabelStats,
    classification_candidates,
    label_stats,
    load_t0_task,
)

__all__ = [
    "ADAPT_K",
    "ADAPT_SEED",
    "ALPACA",
    "BBH_DESCRIPTIONS",
    "BBH_TASKS",
    "PLAIN",
    "BBHExample",
    "BBHTask",
    "BatchIterator",
    "ByteTokenizer",
    "CausalLayout",
    "ClassificationTask",
    "EncoderDecoderLayout",
    "Example",
    "LabelStats",
    "Layout",
    "PromptTemplate",
    "Records",
    "T0Target",
    "TokenizedExample",
    "adapt_indices",
    "bbh_icl_prompt",
    "bbh_prompt",
    "classification_candidates",
    "commonsense_names",
    "epoch_order",
    "exact_match",
    "exact_match_score",
    "gsm8k_final_answer",
    "label_stats",
    "load_bbh",
    "load_bbh_task",
    "load_commonsense",
    "load_gsm8k",
    "load_records",
    "load_t0_target",
    "load_t0_task",
    "load_t0_template",
    "normalize_answer",
    "read_hub",
    "read_json",
    "read_jsonl",
    "t0_icl_prompt",
    "t0_template_names",
    "tokenize_examples",
]
