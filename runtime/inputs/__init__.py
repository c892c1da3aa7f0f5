"""What a query or a candidate becomes before any graph runs: images preprocessed and patchified (numpy, bit-exact
with transformers' processor), M-RoPE and vision positions, chat-template prompts, M-BEIR corpus and query rows,
and the embedder that turns an item into its coarse-stage vector."""
