"""Input data: tokenizers, conversation templates, images, sources and the grain pipeline.

  tokenizers.py    ByteTokenizer / HFTokenizer / SentencePieceTokenizer, load_tokenizer
  conversation.py  templates vicuna_v1, llama3, plain; ids + loss/instruction masks
  images.py        load, pad to square with the mean colour, resize to the master size
  synthetic.py     procedural synthetic VQA (the embedded default) and its export CLI
  validation.py    start-up record checks, skip counts by reason, truncation policy
  llava.py         validated LLaVA JSON + image folder source
  tfds_builder.py  LLaVA JSON → TFDS ArrayRecord build, and its source
  encoder.py       one record → the arrays of one row (ExampleEncoder), collate
  packing.py       data.packing: the global per-epoch row plan and packed rows
  pipeline.py      make_dataset(data_cfg, ...) and default_data_config()
"""
