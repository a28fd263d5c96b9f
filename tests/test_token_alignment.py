"""Prompt-to-prompt token alignment (StyleDiffusion's editing) on the models' real tokenizers,
words of several tokens included."""

import pytest
import torch

from conftest import pack_submodule

alignment = pack_submodule("attention_patches.token_alignment")
tokens = pack_submodule("attention_patches.prompt_tokens")
LENGTH = 77


def encoders(clip):
    return list(clip.tokenize("").keys())


def ids(clip, text, encoder):
    """The prompt's token ids up to its end token (start + words + end), as one chunk holds them."""
    chunk = tokens.chunk_ids(clip.tokenize(text)[encoder])[0]
    end = tokens.chunk_ids(clip.tokenize("")[encoder])[0][1]
    return chunk[:chunk.index(end, 1) + 1]


def words(clip, text, encoder):
    empty = tokens.chunk_ids(clip.tokenize("")[encoder])[0]
    return [tokens.content_ids(tokens.chunk_ids(clip.tokenize(word)[encoder]), empty) for word in text.split()]


@pytest.mark.parametrize("architecture", ["sd15", "sdxl"])
def test_words_tokenised_alone_are_the_prompts_tokens(architecture, request):
    clip = request.getfixturevalue(architecture).clip
    for encoder in encoders(clip):
        text = "a xylophonist painting a tiger"
        assert [t for word in words(clip, text, encoder) for t in word] == ids(clip, text, encoder)[1:-1]


@pytest.mark.parametrize("architecture", ["sd15", "sdxl"])
def test_a_swapped_word_of_another_token_count_spreads_its_attention(architecture, request):
    clip = request.getfixturevalue(architecture).clip
    for encoder in encoders(clip):
        source, target = "a cat sitting", "a xylophonist sitting"
        swapped = len(words(clip, target, encoder)[1])
        assert swapped > 1 and len(words(clip, source, encoder)[1]) == 1
        mapper = alignment.replacement_mapper(words(clip, source, encoder), words(clip, target, encoder), LENGTH)
        assert mapper[0, 0] == 1 and mapper[1, 1] == 1  # start, "a"
        assert torch.allclose(mapper[2, 2:2 + swapped], torch.full((swapped,), 1 / swapped))  # cat -> its tokens
        assert mapper[3, 2 + swapped] == 1  # sitting follows its own position
        assert mapper[4, 3 + swapped] == 1  # the end token too, and the padding after it
        columns = mapper.sum(0)  # every target position is made of the source; the swapped word's share it
        assert torch.allclose(columns[2:2 + swapped], torch.full((swapped,), 1 / swapped))
        assert torch.equal(torch.cat([columns[:2], columns[2 + swapped:]]), torch.ones(LENGTH - swapped))
        maps = torch.softmax(torch.randn(3, 16, LENGTH), dim=-1)
        edited = maps @ mapper
        # the swapped word keeps its total attention, every other token keeps its own
        assert torch.allclose(edited[..., 2:2 + swapped].sum(-1), maps[..., 2])
        assert torch.allclose(edited[..., 2 + swapped], maps[..., 3])


def test_replace_needs_the_same_number_of_words(sd15):
    with pytest.raises(ValueError, match="replace needs prompts of the same number of words: the source has 2, the "
                                         "target 3 \\(use refine"):
        alignment.replacement_mapper(words(sd15.clip, "a cat", "l"), words(sd15.clip, "a big cat", "l"), LENGTH)


@pytest.mark.parametrize("architecture", ["sd15", "sdxl"])
def test_refine_aligns_the_kept_tokens_and_leaves_the_added_words_their_own(architecture, request):
    clip = request.getfixturevalue(architecture).clip
    for encoder in encoders(clip):
        source, target = ids(clip, "a cat on a mat", encoder), ids(clip, "a xylophonist cat on a red mat", encoder)
        added = len(words(clip, "xylophonist", encoder)[0])
        indices, alphas = alignment.refinement_mapper(source, target, LENGTH)
        expected = [0, 1] + [-1] * added + [2, 3, 4, -1, 5, 6]  # start a (added) cat on a (red) mat end
        assert len(expected) == len(target)
        got = [int(i) if a else -1 for i, a in zip(indices[:len(target)], alphas[:len(target)])]
        assert got == expected
        assert alphas[len(target):].eq(1).all()  # padding takes the source's, in order after its end
        assert indices[len(target)] == len(source)


def test_global_alignment_against_brute_force_scores():
    """The alignment found scores as high as any other (checked on short random sequences)."""
    generator = torch.Generator().manual_seed(0)

    def score(source, target, aligned):
        pairs = [(i, j) for j, i in enumerate(aligned) if i >= 0]
        assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(pairs, pairs[1:]))  # monotone
        return sum(1 if source[i] == target[j] else -1 for i, j in pairs)

    def best(source, target):
        if not source or not target:
            return 0
        return max(best(source[1:], target[1:]) + (1 if source[0] == target[0] else -1),
                   best(source[1:], target), best(source, target[1:]))

    for _ in range(40):
        source = torch.randint(0, 3, (int(torch.randint(1, 6, (1,), generator=generator)),), generator=generator).tolist()
        target = torch.randint(0, 3, (int(torch.randint(1, 6, (1,), generator=generator)),), generator=generator).tolist()
        assert score(source, target, alignment.global_alignment(source, target)) == best(source, target)


def test_reweighting_scales_the_chosen_words_tokens():
    scale = alignment.equalizer([[2, 3], [5]], [2.0, 0.5], LENGTH)
    assert scale[2] == scale[3] == 2.0 and scale[5] == 0.5 and scale.sum() == LENGTH - 3 + 4.5
    with pytest.raises(ValueError, match="reweight: 2 words and 1 weights"):
        alignment.equalizer([[2], [5]], [2.0], LENGTH)
