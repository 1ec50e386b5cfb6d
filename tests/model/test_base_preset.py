import pytest
import torch

from model import TWBert, TWBertConfig
from model.profile import count_params


def expected_params(cfg: TWBertConfig) -> dict[str, int]:
    """Parameter counts written out from the architecture (text encoder, TimeSformer video
    encoder, frame scorers, cross-modal encoder, heads: docs/model.md), independently of the
    modules, so a missing or doubled layer shows."""
    v, t, c = cfg.video, cfg.text, cfg.cross
    D = v.dim
    linear = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    norm = 2 * D
    attention = linear(D, 3 * D) + linear(D, D)
    video_block = 2 * (norm + attention) + linear(D, D) + norm \
        + linear(D, v.mlp_ratio * D) + linear(v.mlp_ratio * D, D)
    video = 3 * D * v.patch_size ** 2 + D + D + v.tokens_per_frame * D \
        + v.time_embed_frames * D + v.depth * video_block + norm
    scorer = norm + linear(D, D, False) + linear(2 * D, D, False) + linear(D, 1, False)
    text_layer = 4 * linear(D, D) + norm + linear(D, t.ffn_dim) + linear(t.ffn_dim, D) + norm
    text = (t.vocab_size + t.max_positions + t.type_vocab_size) * D + norm + t.layers * text_layer
    cross_layer = 8 * linear(D, D) + norm + norm + norm + linear(D, c.ffn_dim) \
        + linear(c.ffn_dim, D)
    cross = c.layers * cross_layer + norm
    heads = 2 * linear(D, cfg.itc_dim) + 1 + linear(2 * D, 2)
    if cfg.num_answers:
        heads += linear(2 * D, 2 * D) + linear(2 * D, cfg.num_answers)
    return {"video_encoder": video, "frame_selectors": 2 * scorer if cfg.selector.enabled else 0,
            "text_encoder": text, "cross_modal_encoder": cross, "heads": heads}


def test_tiny_parameter_count_matches_the_architecture():
    cfg = TWBertConfig.tiny(num_answers=9)
    assert count_params(TWBert(cfg)) == expected_params(cfg)


@pytest.mark.slow
@torch.no_grad()
def test_base_preset_parameter_count_and_forward():
    cfg = TWBertConfig.base("20-14-8", num_answers=1500)
    torch.manual_seed(0)
    model = TWBert(cfg).eval()
    counts = count_params(model)
    assert counts == expected_params(cfg)
    # HFS is the paper's "about 4M": two scorers of 3 x 768^2 weights and a LayerNorm.
    assert counts["frame_selectors"] == 3_543_552
    video = torch.randn(1, 20, 3, 224, 224)
    ids = torch.randint(1000, 2000, (1, 40))
    mask = torch.ones(1, 40, dtype=torch.long)
    out = model(video, ids, mask)
    assert out["itm_logits"].shape == (1, 2) and out["qa_logits"].shape == (1, 1500)
    assert out["frame_indices_1"].shape == (1, 14) and out["frame_indices_2"].shape == (1, 8)
    assert all(torch.isfinite(t.float()).all() for t in out.values())
