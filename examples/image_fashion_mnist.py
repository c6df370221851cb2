"""EfficientNet-Lite0 (ImageNet weights, packaged) on Fashion-MNIST: BitFit (incl. BatchNorm) and LoRA on
1x1 convolutions and the head, searched under a 1% budget. Needs `apt-get install dataset-fashion-mnist`.

    .venv/bin/python examples/image_fashion_mnist.py
"""

import logging

import petlsearch
from petlsearch.runners.tasks import get_task
from petlsearch.runners.trainer import TrainConfig

logging.basicConfig(level=logging.INFO, format="%(message)s")
task = get_task("fashion_mnist", "efficientnet-lite0", limit=6000)
result = petlsearch.search(task=task, budget="1%", strategy="random", trials=4, plugins=["bitfit", "lora"],
                           fidelity=TrainConfig(steps=60, batch_size=32, max_eval_examples=512),
                           final=TrainConfig(steps=300, batch_size=32), out="runs/example_image", resume=True)
print(result.structure.result["test"])
