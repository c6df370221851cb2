"""Building blocks that several plugins share, so that no plugin imports another plugin's module.

- `bottleneck`: the down-act-up bottleneck, its sequential and parallel modules, and the plugin base
  of the bottleneck adapters (Houlsby, parallel, SparseAdapter).
- `kronecker`: sums of Kronecker products with low-rank factors (Compacter, KAdaptation).
- `masks`: top-k selection of scored weight entries (FISH, DSEE).
- `prompts`: soft-prompt length limits and vocabulary initialisation (prompt tuning, ATTEMPT).
- `pruning`: magnitude-based structured pruning of a block to narrower widths (Ladder Side Tuning's
  side network).
- `prefix`: prefix tuning's prefix module and its shared reparameterisation (prefix tuning, MAM, the
  unified view).
"""
