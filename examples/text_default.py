"""Search a structure for the packaged all-MiniLM-L6-v2 on Rotten Tomatoes, from Python.

    .venv/bin/python examples/text_default.py
"""

import logging

import petlsearch

logging.basicConfig(level=logging.INFO, format="%(message)s")
result = petlsearch.search(budget="0.1%", strategy="s3pet", plugins=["lora", "adapter", "ia3", "bitfit"],
                           out="runs/example_text", resume=True)
res = result.structure.result
print(f"{res['trainable_params']:,} trainable parameters, test accuracy {res['test']['accuracy']:.4f}")
print("placements:", [f"{p.site}@{p.plugin}" for p in result.structure.placements])
