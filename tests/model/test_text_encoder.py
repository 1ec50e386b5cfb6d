import dataclasses

import pytest
import torch

from model import TWBert, TWBertConfig, to_authors_state_dict
from model.config import TextConfig

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")


@torch.no_grad()
def test_text_encoder_equals_huggingface_bert_with_six_layers():
    tiny = TWBertConfig.tiny()
    text = TextConfig(dim=96, layers=6, heads=4, ffn_dim=384)
    cfg = dataclasses.replace(tiny, text=text, video=dataclasses.replace(tiny.video, dim=96),
                              cross=dataclasses.replace(tiny.cross, dim=96))
    torch.manual_seed(0)
    model = TWBert(cfg).eval()
    # The authors' QA layout stores the text encoder under Hugging Face's own names.
    hf_state = {k.removeprefix("text_encoder."): v
                for k, v in to_authors_state_dict(model, "qa").items()
                if k.startswith("text_encoder.")}
    hf_cfg = transformers.BertConfig(
        vocab_size=text.vocab_size, hidden_size=text.dim, num_hidden_layers=6,
        num_attention_heads=text.heads, intermediate_size=text.ffn_dim,
        max_position_embeddings=text.max_positions, type_vocab_size=text.type_vocab_size,
        layer_norm_eps=text.norm_eps, hidden_act="gelu")
    bert = transformers.BertModel(hf_cfg, add_pooling_layer=False).eval()
    missing, unexpected = bert.load_state_dict(hf_state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)

    torch.manual_seed(1)
    ids = torch.randint(1000, 30000, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    ours = model.encode_text(ids, mask)
    theirs = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    # Padded positions are free in both (nothing reads them); compare the words.
    keep = mask.bool()
    assert (ours[keep] - theirs[keep]).abs().max() <= 1e-5
