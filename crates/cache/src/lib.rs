//! callplane-cache: the Redis backends of phase 2 (usage counters, the function-data cache)
//! and phase 3 (pub/sub). Nothing is here yet: phase 1 runs on Postgres alone, and the seams
//! these backends implement live in `callplane-core`. Depends on `core` and the Redis driver
//! only; never on `api` or `storage`.
