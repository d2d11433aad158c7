"""Prompt templates: how retrieved passages and the question become chat messages."""

from __future__ import annotations

from collections.abc import Sequence

# Measured on benchmarks/eval_qa.py with SmolLM2-135M (top-1 passage, greedy, frequency penalty
# 0.5): short cited answers 0.271 (fp32) / 0.264 (int8) keyword accuracy, against 0.215 / 0.229
# for "Answer the question using only the context below. Copy the exact words, names and code
# from the context."
SYSTEM_PROMPT = ("You are a concise assistant for the Python language. Answer the question "
                 "using the context passages, in one or two sentences, and cite them as [1], [2].")
BARE_SYSTEM_PROMPT = "You are a concise assistant for the Python language. Answer in one or two sentences."


def concat_messages(question: str, passages: Sequence[str], system: str = SYSTEM_PROMPT) -> list[dict]:
    """Chat messages for `concat` mode (passages already ordered and pruned); none -> bare question."""
    if not passages:
        return [{"role": "system", "content": BARE_SYSTEM_PROMPT}, {"role": "user", "content": question}]
    context = "\n\n".join(f"[{i + 1}] {p.strip()}" for i, p in enumerate(passages))
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"}]


def prune_to_budget(texts: Sequence[str], order: Sequence[int], count_tokens, budget: int) -> list[int]:
    """Indices of `texts` in `order` whose token counts fit in `budget` (the first always goes in,
    truncated by the generator's context check if it alone is too long)."""
    chosen, used = [], 0
    for i in order:
        n = count_tokens(texts[i])
        if chosen and used + n > budget:
            break
        chosen.append(i)
        used += n
    return chosen
