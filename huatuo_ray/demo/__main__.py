"""``make demo``: the recipe's stages that exist so far, end to end on a local Ray, offline.

    python -m huatuo_ray.demo --output outputs/demo

Today that is: build the tiny model, convert the bundled consultations (written for this project)
into a dataset artifact on a local Ray, and tokenise them with the chat template and loss mask.
Later stages join this script as they land. A tiny random model produces meaningless text: the
demo shows the plumbing, not a doctor.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from huatuo_ray import artifacts
from huatuo_ray.chat import IGNORE_INDEX, tokenize_dialogue
from huatuo_ray.config import ClusterConfig
from huatuo_ray.data.convert import DataConfig
from huatuo_ray.data.convert import main as data_main
from huatuo_ray.models.stage import TinyModelConfig
from huatuo_ray.models.stage import main as tiny_main

DEMO_DATA = Path(__file__).parent / "data" / "consultations.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="outputs/demo")
    out = Path(parser.parse_args().output)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.time()

    model_dir = tiny_main(TinyModelConfig(output=str(out / "models" / "tiny")))
    data_dir = str(out / "data" / "consultations")
    data_main(
        DataConfig(
            source="jsonl",
            input=str(DEMO_DATA),
            output=data_dir,
            overwrite=True,
            cluster=ClusterConfig(num_cpus=2),
        )
    )

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = artifacts.read_dialogues(data_dir)
    example = tokenize_dialogue(tokenizer, records[0].turns, max_length=512)
    supervised = [t for t, lab in zip(example.input_ids, example.labels) if lab != IGNORE_INDEX]
    print("\n=== huatuo-ray demo ===")
    print(f"tiny model:       {model_dir}")
    print(f"dataset artifact: {data_dir} ({len(records)} dialogues)")
    print(f"first dialogue:   {len(example.input_ids)} tokens, {len(supervised)} supervised")
    print(f"supervised text:  {tokenizer.decode(supervised)[:120]}...")
    print(f"done in {time.time() - started:.0f} s")
    print(
        "Note: the tiny model has random weights and would write meaningless text. Point a stage\n"
        "at a real model with `model.path=<HF id or folder>` once the training stages land."
    )


if __name__ == "__main__":
    main()
