import pytest

from model import TWBertConfig, parse_schedule


@pytest.mark.parametrize("text, expected", [
    ("32-24-16", (32, (24, 16))),
    ("20-14-8", (20, (14, 8))),
    ("8", (8, ())),
])
def test_schedule_parsing(text, expected):
    assert parse_schedule(text) == expected


def test_derived_values_of_the_paper_model():
    cfg = TWBertConfig.base("32-24-16")
    assert cfg.video.tokens_per_frame == 197
    assert cfg.selector.frames_after == (24, 16)
    assert cfg.video_tokens == 1 + 49 * 16
    no_selection = TWBertConfig.base("8")
    assert not no_selection.selector.enabled
    assert no_selection.video_tokens == 1 + 49 * 8


@pytest.mark.parametrize("schedule, layers, constraint", [
    ("16-24-8", (6, 12), "T >= K1 >= K2 >= 1"),
    ("32-8-16", (6, 12), "T >= K1 >= K2 >= 1"),
    ("32-24-0", (6, 12), "T >= K1 >= K2 >= 1"),
    ("32-24-16", (12, 6), "1 <= s1 < s2 <= depth"),
    ("32-24-16", (6, 13), "1 <= s1 < s2 <= depth"),
    ("32-24-16", (0, 6), "1 <= s1 < s2 <= depth"),
    ("32-24", (6, 12), "T-K1-K2"),
    ("a-b-c", (6, 12), "integers"),
    ("32-24-16", "6", "two block numbers"),
])
def test_invalid_schedules_name_the_constraint(schedule, layers, constraint):
    with pytest.raises(ValueError, match=constraint.replace("(", r"\(").replace(")", r"\)")):
        TWBertConfig.base(schedule, layers)


def test_config_round_trips_through_a_dict():
    cfg = TWBertConfig.tiny("8-6-4", "1,3", num_answers=5)
    assert TWBertConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="malformed"):
        TWBertConfig.from_dict({"video": {}})


def test_with_schedule_keeps_the_weights_shape():
    cfg = TWBertConfig.tiny().with_schedule("8")
    assert not cfg.selector.enabled and cfg.video == TWBertConfig.tiny().video
