"""The fast sampler: the reverse process of `generate` with everything that costs nothing in
quality removed, the approximations that buy speed as explicit settings, and rows that come and
go independently.

Lossless (token-identical to `generate` at temperature 0):
- the output head runs only on each row's current block;
- a row whose answer has ended (an end-of-text with everything before it revealed) leaves, and
  so does a row that has revealed everything: finished rows stop costing work.

Approximate, chosen per row in its `SamplerConfig`:
- `cache`: the keys and values of positions outside the current block, computed by a full pass
  when the block starts (that pass is also the block's first step) and reused for the rest of the
  block: `prefix` keeps the prompt and finished blocks and recomputes the block and the masked
  suffix; `dual` keeps the suffix too and recomputes only the block (Fast-dLLM's caches). The
  cached values are stale by what the block has revealed since the refresh.
- `parallel`: how many masked tokens a step reveals (`reveal`).

`Engine` holds rows that each have their own prompt, sampler settings, random generator and
progress through their blocks; a row added between steps starts with the next step. Each step,
the `scheduler` says which rows take which kind of pass, the `runner` runs one forward pass per
kind over its rows (the cache protocol: what each pass recomputes, reuses and keeps), and
`reveal` takes each row one step on from its block's logits. So a server can batch requests as
they arrive, and a request's answer does not depend on what it is batched with. `generate_fast`
runs a left-padded batch through it. A row may also infill (`add_infill`, `fill_masks_fast`):
reveal the masks of one region of a given text, blocks over the region, the rest context.

The model is a `Transformer` (the `positions` / `past` / `return_kv` / `logits_at` interface of
`remask.model`); logits past `vocab_size` (padded embedding rows) are ignored.
"""

from remask.sampling.engine.engine import Engine, fill_masks_fast, generate_fast
from remask.sampling.engine.reveal import reveal_counts
from remask.sampling.engine.rows import Row, RowResult, SamplingStats
from remask.sampling.engine.runner import PASSES, PassKind, PassSpec

__all__ = ["Engine", "PASSES", "PassKind", "PassSpec", "Row", "RowResult", "SamplingStats", "fill_masks_fast",
           "generate_fast", "reveal_counts"]
