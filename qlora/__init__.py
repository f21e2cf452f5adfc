"""Shared code for the QLoRA pipeline's four scripts (data_processing, pretokenize, finetune, predict).

Contracts between the stages (each script validates what it reads):
  data_processing.py -> DIR/{train,validation}.jsonl, one record a line:
      {"text": "<|begin_of_text|>...", "format": "plain"|"chat", "prompt": ..., "response": ...}
      ("prompt"/"response" only for data split by a separator), plus DIR/metadata.json.
  pretokenize.py -> OUT/{train,validation}/shard-NNNNN.parquet with columns
      input_ids list<int32>, labels list<int32>, doc_lens list<int32>; every row exactly max_len long;
      documents first, padding (pad_id, label -100) at the tail: sum(doc_lens) == non-pad tokens.
      OUT/metadata.json holds tokenizer name/sha256, max_len, pad_id, counts, fill rate.
  finetune.py -> RUN/ with config.json, metrics.jsonl, checkpoints/, final adapter (PEFT format) + tokenizer.
"""
