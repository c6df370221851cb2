#!/usr/bin/env bash
# A third-party plugin, two ways: installed (its entry point registers it) or named explicitly.
set -euo pipefail
.venv/bin/pip install -q --no-deps --no-build-isolation -e examples/petlsearch-ln-tuning
.venv/bin/petlsearch plugins | grep ln_tuning
.venv/bin/petlsearch search --plugins ln_tuning,bitfit --budget 0.05% --trials 2 --out runs/example_ln --resume
# without installing: --plugin package.module:Class
.venv/bin/petlsearch search --plugin petlsearch_ln_tuning:LNTuning --plugins lora --trials 2 --out runs/example_ln2 --resume
