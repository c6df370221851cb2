"""How an attached module acts on a model: the public mechanisms a plugin builds its modules on.

- `hooks`: the module base (`PETLModule`) and the five hook mechanisms (output, sequential and
  parallel deltas, scales, weight updates); also exported by `petlsearch.plugins`.
- `tokens`: tokens inserted into a layer's input (`TokenModule`; prompt tuning, VPT, VQT, ATTEMPT).
- `kv_prefix`: keys and values prepended to an attention (`KVPrefix`; prefix tuning, HyperPrompt).
- `lean_attention`: attention that stores less for its backward (Ladder Side Tuning's side network).
"""
