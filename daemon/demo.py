"""The README's main job on the embedded defaults: local Kafka, SmolLM2, an answer.

It grows with the project (stream corrections, edit, audit, version); each step prints one line
on stdout so a newcomer sees what happened and how long it took.
"""

from __future__ import annotations

import time

from daemon import kafka_broker
from editing.generation import greedy_generate
from editing.models import load_model


def run_demo(
    port: int = 9092, prompt: str = "The capital of France is", keep_broker: bool = False
) -> int:
    """Start the broker, load the model, answer ``prompt``; stop the broker if we started it."""
    cfg = kafka_broker.LocalBrokerConfig(port=port)
    was_running = kafka_broker.status(cfg).running
    started = time.perf_counter()
    broker = kafka_broker.start(cfg)
    print(f"[1/3] kafka ready at {broker.bootstrap} ({time.perf_counter() - started:.1f} s)")
    try:
        lm = load_model("smollm2")
        source = "safetensors cache" if lm.from_cache else "GGUF, now cached"
        print(f"[2/3] model {lm.name} loaded from {source} ({lm.load_seconds:.1f} s)")
        [answer] = greedy_generate(lm.model, lm.tokenizer, [prompt], max_new_tokens=12)
        print(f"[3/3] {prompt!r} -> {answer!r}")
    finally:
        if not (was_running or keep_broker):
            kafka_broker.stop(cfg)
    return 0
