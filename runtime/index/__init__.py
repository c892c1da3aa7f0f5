"""The coarse stage's storage: the HNSW graph (`ann`, verified before hnswlib reads it), the candidate token cache
(`token_cache`, int8 merged vision tokens, memory-mapped), and the index folder that binds them into versioned
generations (`store`: `Index`, `IndexSnapshot`)."""
