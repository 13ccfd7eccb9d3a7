"""Start-up and throughput of the LLaVA data source on one host.

Writes a synthetic LLaVA JSON of --records records, each with its own small JPEG (as
LLaVA-665K has one image file per record), then measures
  1. reading the JSON (records/s),
  2. start-up validation (fields, conversation, length with the byte tokenizer, image
     check) for each --image_check mode (records/s), and the extrapolation to 665K records
     on --processes processes (each checks 1/P of the records);
  3. examples/s of the train pipeline (decode, pad, resize, tokenize, batch) with 0 and
     --workers grain worker processes.

  python -m benchmarks.data_startup --records 20000 --workers 2

Generating 665K image files takes long on a small machine, so the default set is smaller
and the 665K figures are extrapolated (validation cost is linear in the records).
"""

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

LLAVA_665K = 665_298


def write_dataset(root: str, num: int, size: int, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
  records = []
  for i in range(num):
    name = f"images/{i:07d}.jpg"
    pixels = np.roll(base, i % size, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
    with open(os.path.join(root, name), "wb") as f:
      f.write(buffer.getvalue())
    records.append({"id": str(i), "image": name, "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown in the picture?"},
        {"from": "gpt", "value": f"A pattern shifted by {i % size} pixels."}]})
  path = os.path.join(root, "train.json")
  with open(path, "w") as f:
    json.dump(records, f)
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--records", type=int, default=20_000)
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--processes", type=int, default=32,
                      help="hosts for the 665K extrapolation (e.g. a v5e-256 has 64)")
  parser.add_argument("--dir", default="", help="reuse/keep the generated set here")
  args = parser.parse_args()

  from leo_mini_jax.data import conversation as conv  # pylint: disable=g-import-not-at-top
  from leo_mini_jax.data import llava  # pylint: disable=g-import-not-at-top
  from leo_mini_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from leo_mini_jax.data import tokenizers  # pylint: disable=g-import-not-at-top

  root = args.dir or tempfile.mkdtemp(prefix="data_startup_")
  path = os.path.join(root, "train.json")
  start = time.perf_counter()
  if not os.path.exists(path):
    write_dataset(root, args.records, args.image_size)
  print(f"dataset: {args.records} records with {args.image_size}px JPEGs in {root} "
        f"(written in {time.perf_counter() - start:.1f} s)")

  start = time.perf_counter()
  records = llava.read_llava_json(path)
  elapsed = time.perf_counter() - start
  print(f"read JSON: {len(records) / elapsed:,.0f} records/s "
        f"(665K: {LLAVA_665K / (len(records) / elapsed):.1f} s, on every process)")

  check = llava.LengthCheck(tokenizers.ByteTokenizer(), conv.get_template("vicuna_v1", ""),
                            256)
  for mode in ("exists", "verify", "decode"):
    start = time.perf_counter()
    kept, _ = llava.validate_records(records, root, path, length_check=check,
                                     image_check=mode)
    elapsed = time.perf_counter() - start
    rate = len(records) / elapsed
    print(f"validate image_check={mode!r}: {rate:,.0f} records/s on one process "
          f"({len(kept)} kept); 665K records: {LLAVA_665K / rate:,.0f} s on 1 process, "
          f"{LLAVA_665K / rate / args.processes:,.1f} s on {args.processes}")

  cfg = pipeline.default_data_config()
  cfg.update(kind="llava", train_json=path, batch_size=32, max_length=256, resolution=256,
             system_prompt="", image_check="exists")
  for workers in (0, args.workers):
    cfg.num_workers = workers
    data = pipeline.make_dataset(cfg, split="train", process_index=0, process_count=1)
    iterator = iter(data)
    next(iterator)  # start-up (workers spawn) excluded
    start = time.perf_counter()
    for _ in range(args.batches):
      next(iterator)
    elapsed = time.perf_counter() - start
    print(f"train pipeline, {workers} grain workers: "
          f"{args.batches * cfg.batch_size / elapsed:,.0f} examples/s "
          f"(256px master images, batch {cfg.batch_size})")


if __name__ == "__main__":
  main()
