"""Where a word sits among a prompt's tokens, on the model's own tokenizer output (a word may be
several tokens; a prompt past one chunk continues at the next chunk's positions, as ComfyUI
concatenates the chunks' embeddings)."""


class TokenError(ValueError):
    pass


def chunk_ids(tokenized: list[list[tuple]]) -> list[list[int]]:
    """Token ids per chunk from a ComfyUI tokenizer's output for one encoder ([(id, weight, ...)] per chunk)."""
    return [[int(token[0]) for token in chunk] for chunk in tokenized]


def content_ids(chunks: list[list[int]], empty: list[int]) -> list[int]:
    """A short text's own token ids: its one chunk between the start token and the end token (the empty
    prompt's chunk is start, end, padding). A token equal to the padding id (SDXL's clip_g pads with
    id 0, which is also "!") stays a token of the text."""
    chunk, end = chunks[0], empty[1]
    return chunk[1:chunk.index(end, 1)] if end in chunk[1:] else chunk[1:]


def word_positions(prompt: list[list[int]], word: list[int], name: str = "word") -> list[int]:
    """Key positions of every occurrence of the word's tokens in the prompt, all its tokens."""
    if not word:
        raise TokenError(f"{name}: has no tokens of its own")
    positions, offset = [], 0
    for chunk in prompt:
        for start in range(len(chunk) - len(word) + 1):
            if chunk[start:start + len(word)] == word:
                positions.extend(range(offset + start, offset + start + len(word)))
        offset += len(chunk)
    if not positions:
        raise TokenError(f"{name}: its tokens {word} are not in the prompt's")
    return positions
