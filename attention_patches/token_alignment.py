"""Prompt-to-prompt token alignment (Hertz et al. 2022, as StyleDiffusion edits with it): how the
target prompt's cross-attention maps are made of the source prompt's, on the model's own token ids.

- replace (word swap, same number of words): a mapper M (source positions x target positions); the
  target's maps are A_src @ M. A word of k source tokens swapped for one of m target tokens spreads
  its attention evenly, M[s, t] = 1 / m for each pair, so a word's total attention is kept.
- refine (words added): a global alignment of the two token sequences; each aligned target token
  takes its source token's map, an inserted one keeps its own.
- reweight: a per-token scale on the target's maps for chosen words.

Positions past the prompts' own tokens (the end and padding tokens) map one to one in order. The
authors' replace mapper (from the prompt-to-prompt code) puts those on the diagonal M[j, j], which
misplaces them when the prompts' token counts differ; here they follow their own positions.
"""

import torch

from .prompt_tokens import TokenError, word_positions
from .prompt_to_prompt import CrossAttentionEdit


def replacement_mapper(source_words: list[list[int]], target_words: list[list[int]], length: int) -> torch.Tensor:
    """(length, length) mapper from each prompt's words, as token-id lists in order (the start token at 0)."""
    if len(source_words) != len(target_words):
        raise TokenError(f"replace needs prompts of the same number of words: the source has {len(source_words)}, "
                         f"the target {len(target_words)} (use refine to add words)")
    mapper = torch.zeros(length, length)
    mapper[0, 0] = 1.0
    source_at, target_at = 1, 1
    for source, target in zip(source_words, target_words):
        if source_at + len(source) > length or target_at + len(target) > length:
            raise TokenError(f"the prompts are longer than the {length} positions one chunk holds")
        if len(source) == len(target):
            for offset in range(len(source)):
                mapper[source_at + offset, target_at + offset] = 1.0
        else:
            mapper[source_at:source_at + len(source), target_at:target_at + len(target)] = 1.0 / len(target)
        source_at, target_at = source_at + len(source), target_at + len(target)
    while source_at < length and target_at < length:
        mapper[source_at, target_at] = 1.0
        source_at, target_at = source_at + 1, target_at + 1
    return mapper


def global_alignment(source: list[int], target: list[int]) -> list[int]:
    """For each target position, the source position aligned with it, or -1 where the target inserts a
    token (Needleman-Wunsch: match +1, mismatch -1, gap 0; ties prefer an insertion, then a deletion)."""
    rows, columns = len(source) + 1, len(target) + 1
    score = [[0] * columns for _ in range(rows)]
    for i in range(1, rows):
        for j in range(1, columns):
            diagonal = score[i - 1][j - 1] + (1 if source[i - 1] == target[j - 1] else -1)
            score[i][j] = max(diagonal, score[i - 1][j], score[i][j - 1])
    aligned = [-1] * len(target)
    i, j = len(source), len(target)
    while i > 0 and j > 0:
        if score[i][j] == score[i][j - 1]:
            j -= 1  # target token j - 1 inserted
        elif score[i][j] == score[i - 1][j]:
            i -= 1  # source token i - 1 dropped
        else:
            aligned[j - 1] = i - 1
            i, j = i - 1, j - 1
    return aligned


def refinement_mapper(source: list[int], target: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, alphas) of length: target position j takes source map indices[j] where alphas[j] is 1
    (aligned tokens), keeps its own where 0 (inserted); positions past the target's tokens follow in order."""
    if len(source) > length or len(target) > length:
        raise TokenError(f"the prompts are longer than the {length} positions one chunk holds")
    aligned = global_alignment(source, target)
    indices = torch.arange(length)
    alphas = torch.ones(length)
    for j, i in enumerate(aligned):
        indices[j] = max(i, 0)
        alphas[j] = 1.0 if i >= 0 else 0.0
    last_source = max([i for i in aligned if i >= 0], default=0)
    for j in range(len(target), length):
        indices[j] = min(last_source + 1 + j - len(target), length - 1)
    return indices, alphas


def equalizer(positions: list[list[int]], weights: list[float], length: int) -> torch.Tensor:
    """(length,) scale: 1 everywhere but at each word's positions, its weight."""
    if len(positions) != len(weights):
        raise TokenError(f"reweight: {len(positions)} words and {len(weights)} weights; give one weight per word")
    scale = torch.ones(length)
    for word, weight in zip(positions, weights):
        scale[word] = float(weight)
    return scale


EDIT_MODES = ("replace", "refine", "reweight")


def edit_maps(mode: str, source: list[int], target: list[int], source_words: list[list[int]],
              target_words: list[list[int]], weighted: list[tuple[list[int], float]], length: int):
    """The CrossAttentionEdit of an edit on one tokenizer's ids: source and target are the prompts'
    ids from the start token to the end token, *_words each word's own ids, weighted (a target word's
    ids, its weight) pairs. reweight is refine's alignment (one to one for the same prompt) with weights."""
    if mode not in EDIT_MODES:
        raise TokenError(f"edit_mode: expected one of {', '.join(EDIT_MODES)}, got {mode!r}")
    if mode == "reweight" and not weighted:
        raise TokenError("reweight: give words and weights, e.g. 'fluffy:2, cat:0.5'")
    weights = equalizer([word_positions([target], word, "reweight") for word, _ in weighted],
                        [weight for _, weight in weighted], length)
    if mode == "replace":
        return CrossAttentionEdit.replace(replacement_mapper(source_words, target_words, length), weights)
    indices, alphas = refinement_mapper(source, target, length)
    return CrossAttentionEdit.refine(indices, alphas, weights)
