"""The reasoning rerank: the prompt a window is shown (`prompt`), the decode loop under budgets (`loop`, `budget`),
the constrained answer (`answer`), and V-Retrver's image tools (`tools`, `tool_session`)."""
