"""Shared code for the QLoRA pipeline's four scripts (data_processing, pretokenize, finetune, predict).

Contracts between the stages ("contract N" elsewhere; each script validates what it reads):
  1. data_processing.py -> DIR/{train,validation}.jsonl, one record a line:
       {"text": "<|begin_of_text|>...", "format": "plain"|"chat", "prompt": ..., "response": ...}
       ("prompt"/"response" only for data split by a separator).
  2. data_processing.py -> DIR/metadata.json: the hand vocabulary (sha256 of its id->token mapping, the special
       tokens chosen) and the options (format, joiner, system prompt). pretokenize.py carries it into its own
       metadata, finetune.py into RUN/config.json, and predict.py reads it back from there (or from the
       metadata.json next to its --input).
  3. pretokenize.py -> OUT/{train,validation}/shard-NNNNN.parquet with columns
       input_ids list<int32>, labels list<int32>, doc_lens list<int32>; every row exactly max_len long, row groups
       of at most 64 rows; documents first, padding (pad_id, label IGNORE_INDEX = -100) at the tail:
       sum(doc_lens) == non-pad tokens. OUT/metadata.json holds tokenizer name/sha256, max_len, pad_id, counts,
       fill rate, and contract 2's record.
  4. finetune.py -> RUN/ with config.json, status.json, metrics.jsonl, tensorboard/, checkpoints/step-NNNNNNN/ and
       the final adapter/ (PEFT format) + tokenizer (qlora/rundir.py lists every name).

Modules by stage:
  every stage   errors (UserError, one-line errors), atomic (write-then-rename), llama3 (formats, special ids,
                LoRA targets, the 8B config, tokenizer loading)
  stage 1       vocab (hand vocabularies), sequences (id sequences from npy/npz/pt/txt/jsonl/parquet)
  stage 2       packing (JSONL -> token ids -> packed rows), shards (contract 3: parquet writer and reader)
  stage 3       config (TrainConfig and its flags), data (packed rows in a seeded order across ranks),
                model (4-bit base, LoRA, the training forward), loss (chunked cross-entropy), speed (the GPU fast
                path), memory (peak GPU memory estimate), plan (kernels and recomputed blocks that fit the GPU),
                distributed (ranks and collectives), training (optimizer, LR schedule, validation loss),
                checkpoint (save and resume), rundir (contract 4)
  stage 4       generation (prompts, batched generation, scoring in the hand vocabulary)
  tests, bench  tiny_model (a small random Llama-3-shaped model with the real tokenizer)
"""
