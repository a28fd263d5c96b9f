"""Reference + target prompts become one batched CONDITIONING, item i encoding prompt i."""

import torch

from helpers import encode, run_node


def test_each_batch_item_is_its_own_prompt_with_the_style_appended(models):
    conditioning, batch_size = run_node("ReferenceTargetPrompts", clip=models.clip, reference_prompt="a cat",
                                        target_prompts="a dog\n\na house\n", style_description="watercolor")
    assert batch_size == 3
    ((embeddings, extras),) = conditioning
    assert embeddings.shape[0] == 3
    for item, text in enumerate(["a cat, watercolor", "a dog, watercolor", "a house, watercolor"]):
        ((alone, alone_extras),) = encode(models.clip, text)
        torch.testing.assert_close(embeddings[item:item + 1], alone)
        torch.testing.assert_close(extras["pooled_output"][item:item + 1], alone_extras["pooled_output"])


def test_sdxl_batch_gives_every_item_its_own_adm_vector(sdxl):
    conditioning, _ = run_node("ReferenceTargetPrompts", clip=sdxl.clip, reference_prompt="a cat",
                               target_prompts="a dog", style_description="")
    pooled = conditioning[0][1]["pooled_output"]
    adm = sdxl.model.model.encode_adm(pooled_output=pooled, width=64, height=64)
    assert adm.shape == (2, sdxl.model.model.adm_channels)
    assert not torch.allclose(adm[0], adm[1])
