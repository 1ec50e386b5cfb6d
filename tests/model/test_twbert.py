import pytest
import torch
import torch.nn.functional as F

from model import TWBert, TWBertConfig


def run_stages(model: TWBert, video, ids, mask):
    """The full forward written as its deployment stages."""
    text_embeds = model.encode_text(ids, mask)
    stem = model.encode_video_stem(video)
    video_out = model.select_and_encode(stem, text_embeds[:, 0])
    fused = model.fuse(text_embeds, mask, video_out["video_embeds"])
    heads = model.heads(fused, ids.shape[1])
    _, _, sim = model.itc(text_embeds[:, 0], video_out["video_embeds"][:, 0])
    return heads, sim, video_out


@torch.no_grad()
def test_stage_composition_equals_full_forward(tiny_model, make_inputs):
    video, ids, mask = make_inputs(tiny_model.cfg, 3)
    out = tiny_model(video, ids, mask)
    heads, sim, video_out = run_stages(tiny_model, video, ids, mask)
    for name in ("itm_logits", "qa_logits"):
        assert torch.equal(out[name], heads[name]), name
    assert torch.equal(out["itc_sim"], sim)
    for name in ("frame_scores_1", "frame_indices_1", "frame_scores_2", "frame_indices_2"):
        assert torch.equal(out[name], video_out[name]), name


@torch.no_grad()
def test_forward_from_stem_equals_full_forward(tiny_model, make_inputs):
    """One video's stem against several texts gives what the full forward gives per pair."""
    video, ids, mask = make_inputs(tiny_model.cfg, 3)
    same_video = video[:1].expand(3, *video.shape[1:])
    out = tiny_model(same_video, ids, mask)
    stem = tiny_model.encode_video_stem(video[:1]).expand(3, -1, -1, -1)
    from_stem = tiny_model.forward_from_stem(stem, ids, mask)
    assert out.keys() == from_stem.keys()
    for name in out:
        torch.testing.assert_close(from_stem[name], out[name], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="2 stems but 3 texts"):
        tiny_model.forward_from_stem(stem[:2], ids, mask)


@torch.no_grad()
def test_outputs_have_the_documented_shapes(tiny_model, make_inputs):
    cfg = tiny_model.cfg
    video, ids, mask = make_inputs(cfg, 2)
    out = tiny_model(video, ids, mask)
    T, (K1, K2) = cfg.selector.frames, cfg.selector.keep
    expected = {"itm_logits": (2, 2), "qa_logits": (2, cfg.num_answers), "itc_sim": (2,),
                "text_feat": (2, cfg.itc_dim), "video_feat": (2, cfg.itc_dim),
                "frame_scores_1": (2, T), "frame_indices_1": (2, K1),
                "frame_scores_2": (2, K1), "frame_indices_2": (2, K2)}
    assert {k: tuple(v.shape) for k, v in out.items()} == expected
    assert out["frame_indices_1"].dtype == torch.int64
    # Selector 2 keeps a subset of selector 1's frames, both in temporal order.
    for i1, i2 in zip(out["frame_indices_1"].tolist(), out["frame_indices_2"].tolist()):
        assert i1 == sorted(i1) and i2 == sorted(i2) and set(i2) <= set(i1)
    assert torch.allclose(out["frame_scores_1"].sum(-1), torch.ones(2))


@torch.no_grad()
def test_batch_of_one_and_batch_of_three_agree_per_sample(tiny_model, make_inputs):
    video, ids, mask = make_inputs(tiny_model.cfg, 3)
    batched = tiny_model(video, ids, mask)
    for i in range(3):
        single = tiny_model(video[i:i + 1], ids[i:i + 1], mask[i:i + 1])
        for name, value in single.items():
            if value.is_floating_point():
                torch.testing.assert_close(value[0], batched[name][i], atol=1e-5, rtol=1e-4)
            else:
                assert torch.equal(value[0], batched[name][i]), name


@torch.no_grad()
def test_eval_is_bitwise_deterministic(tiny_model, make_inputs):
    video, ids, mask = make_inputs(tiny_model.cfg, 3)
    first, second = tiny_model(video, ids, mask), tiny_model(video, ids, mask)
    assert all(torch.equal(first[k], second[k]) for k in first)


@torch.no_grad()
def test_padded_words_do_not_change_the_answer(tiny_model, make_inputs):
    video, ids, mask = make_inputs(tiny_model.cfg, 1, text_len=8)
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=ids.dtype)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 4, dtype=mask.dtype)], dim=1)
    short, long = tiny_model(video, ids, mask), tiny_model(video, padded_ids, padded_mask)
    for name in ("itm_logits", "qa_logits", "itc_sim", "frame_scores_1"):
        torch.testing.assert_close(short[name], long[name], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_static_video_with_tied_scores_gives_finite_agreeing_outputs(tiny_cfg, make_inputs):
    """A static clip with no time embedding scores every frame equally: the tie-break picks the
    earliest frames, and since the frames are equal any choice gives the same answer."""
    torch.manual_seed(0)
    model = TWBert(tiny_cfg).eval()
    model.video.time_embed.data.zero_()
    video, ids, mask = make_inputs(tiny_cfg, 1)
    video = video[:, :1].expand_as(video).contiguous()
    out = model(video, ids, mask)
    scores = out["frame_scores_1"]
    assert torch.allclose(scores, scores[:, :1].expand_as(scores), atol=1e-6)
    assert all(torch.isfinite(v.float()).all() for v in out.values())
    with model.selection("perturbed"):
        torch.manual_seed(1)
        other_choice = model(video, ids, mask)
    torch.testing.assert_close(other_choice["itm_logits"], out["itm_logits"], atol=1e-4, rtol=1e-4)


def test_training_step_reaches_the_frame_scorers(tiny_cfg, make_inputs):
    torch.manual_seed(0)
    model = TWBert(tiny_cfg).train()
    video, ids, mask = make_inputs(tiny_cfg, 2)
    out = model(video, ids, mask)
    loss = F.cross_entropy(out["itm_logits"], torch.tensor([1, 0])) \
        + F.cross_entropy(out["qa_logits"], torch.tensor([3, 4]))
    loss.backward()
    for selector in model.selectors:
        for name, p in selector.scorer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"no gradient reached the scorer's {name}"


@torch.no_grad()
def test_training_uses_perturbed_selection_and_eval_hard(tiny_model):
    selector = tiny_model.selector1
    frames = torch.randn(2, 8, 5, tiny_model.cfg.dim)
    text_cls = torch.randn(2, tiny_model.cfg.dim)
    hard_kept, _, hard_idx = selector(frames, text_cls)
    assert torch.equal(hard_kept, frames[torch.arange(2)[:, None], hard_idx])
    with tiny_model.selection("perturbed"):
        torch.manual_seed(0)
        soft_a = selector(frames, text_cls)[0]
        torch.manual_seed(1)
        soft_b = selector(frames, text_cls)[0]
    # Perturbed selection mixes frames by sample frequency: random, and not the hard pick.
    assert not torch.equal(soft_a, soft_b)
    assert not torch.allclose(soft_a, hard_kept, atol=1e-3)
    selector.train()
    try:
        torch.manual_seed(0)
        assert torch.equal(selector(frames, text_cls)[0], soft_a), "training mode is perturbed"
    finally:
        selector.eval()
    with pytest.raises(ValueError, match="selection mode"):
        with tiny_model.selection("random"):
            pass


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_runs_in_half_precision_with_the_same_choices(tiny_model, make_inputs, dtype):
    video, ids, mask = make_inputs(tiny_model.cfg, 3)
    ref = tiny_model(video, ids, mask)
    half = TWBert(tiny_model.cfg).eval()
    half.load_state_dict(tiny_model.state_dict())
    half.to(dtype)
    out = half(video.to(dtype), ids, mask)
    assert all(torch.isfinite(v.float()).all() for v in out.values())
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    torch.testing.assert_close(out["itm_logits"].float(), ref["itm_logits"], atol=tol, rtol=tol)
    torch.testing.assert_close(out["frame_scores_1"], ref["frame_scores_1"], atol=tol, rtol=tol)
    for name in ("frame_indices_1", "frame_indices_2"):  # the same frames kept
        assert torch.equal(out[name], ref[name]), f"{dtype} keeps other frames in {name}"


@torch.no_grad()
def test_bf16_autocast_runs(tiny_model, make_inputs):
    video, ids, mask = make_inputs(tiny_model.cfg, 2)
    ref = tiny_model(video, ids, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model(video, ids, mask)
    assert out["frame_scores_1"].dtype == torch.float32, "selection must stay in FP32"
    torch.testing.assert_close(out["itm_logits"].float(), ref["itm_logits"], atol=0.1, rtol=0.1)


@torch.no_grad()
def test_schedule_without_selection(make_inputs):
    cfg = TWBertConfig.tiny("8")
    torch.manual_seed(0)
    model = TWBert(cfg).eval()
    video, ids, mask = make_inputs(cfg, 2)
    out = model(video, ids, mask)
    assert not any(k.startswith("frame_") for k in out)
    assert not hasattr(model, "selector1")
    assert out["itm_logits"].shape == (2, 2)


@torch.no_grad()
def test_other_frame_counts_interpolate_the_time_embedding(tiny_model, make_inputs):
    cfg = tiny_model.cfg.with_schedule("12-8-4")
    model = TWBert(cfg).eval()
    model.load_state_dict(tiny_model.state_dict())
    video, ids, mask = make_inputs(cfg, 1)
    assert model(video, ids, mask)["frame_indices_2"].shape == (1, 4)


def test_bad_inputs_raise_clear_errors(tiny_model, make_inputs):
    video, ids, mask = make_inputs(tiny_model.cfg, 2)
    with pytest.raises(ValueError, match=r"video must be \(B, 8, 3, H, W\)"):
        tiny_model(video[:, :5], ids, mask)
    with pytest.raises(ValueError, match="batch of 2 videos but 1 texts"):
        tiny_model(video, ids[:1], mask[:1])
    with pytest.raises(ValueError, match="attention_mask"):
        tiny_model(video, ids, mask[:, :3])


def test_from_scratch_tables_tell_every_patch_position_and_frame_apart(tiny_cfg):
    """Sin-cos start for the position and time tables: each patch position and each frame has its
    own, well separated embedding (small random tables left a from-scratch model blind to the
    camera motion of the demo)."""
    from model.twbert import POSITION_TABLE_SCALE, sincos_1d, sincos_2d

    model = TWBert(tiny_cfg)
    grid, frames = model.video.pos_embed[0, 1:], model.video.time_embed[0]
    for table in (grid, frames):
        distances = torch.cdist(table, table) + torch.eye(len(table)) * 1e9
        assert distances.min() > 0.1
    expected = sincos_2d(tiny_cfg.video.grid, tiny_cfg.dim) * POSITION_TABLE_SCALE
    torch.testing.assert_close(grid, expected)
    # row-major patches: the first half encodes the row, the second the column
    table = sincos_2d(4, 8)
    assert torch.equal(table[1, :4], table[0, :4]) and not torch.equal(table[1, 4:], table[0, 4:])
    assert torch.equal(table[4, 4:], table[0, 4:]) and not torch.equal(table[4, :4], table[0, :4])
    assert sincos_1d(3, 4)[0].tolist() == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(4, 6)
