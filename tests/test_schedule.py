"""The A1111 learning-rate schedule syntax: what rate each step gets, and which strings are refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ti_core.schedule import learning_rate_at, parse_schedule

rates = st.floats(min_value=1e-8, max_value=10.0, allow_nan=False)


def test_the_web_ui_example():
    schedule = parse_schedule("0.005:100, 1e-3:1000, 1e-5")
    assert schedule == [(0.005, 100), (1e-3, 1000), (1e-5, None)]
    assert [learning_rate_at(schedule, step) for step in (0, 99, 100, 999, 1000, 10**6)] == [
        0.005,
        0.005,
        1e-3,
        1e-3,
        1e-5,
        1e-5,
    ]


@given(rates, st.integers(0, 10**7))
def test_a_bare_number_is_constant(rate, step):
    assert learning_rate_at(parse_schedule(repr(rate)), step) == rate


@given(rates, st.integers(0, 10**7))
def test_minus_one_means_to_the_end(rate, step):
    assert learning_rate_at(parse_schedule(f"{rate!r}:-1"), step) == rate


@given(
    st.lists(st.tuples(rates, st.integers(1, 10**6)), min_size=1, max_size=6, unique_by=lambda pair: pair[1]), rates
)
def test_each_stage_runs_until_its_step(stages, last_rate):
    stages = sorted(stages, key=lambda pair: pair[1])
    text = ", ".join(f"{rate!r}:{until}" for rate, until in stages) + f", {last_rate!r}"
    schedule = parse_schedule(text)
    start = 0
    for rate, until in stages:
        assert learning_rate_at(schedule, start) == rate  # first step of the stage
        assert learning_rate_at(schedule, until - 1) == rate  # last step of the stage
        start = until
    assert learning_rate_at(schedule, start) == last_rate


def test_the_last_rate_carries_on_after_the_last_step():
    assert learning_rate_at(parse_schedule("0.01:10, 0.001:20"), 500) == 0.001


@given(st.integers(1, 1000), st.integers(0, 2000))
def test_warmup_ramps_linearly_to_the_scheduled_rate(warmup, step):
    rate = learning_rate_at(parse_schedule("0.004"), step, warmup_steps=warmup)
    expected = 0.004 * min(1.0, (step + 1) / warmup)
    assert rate == pytest.approx(expected)
    assert 0 < rate <= 0.004


@pytest.mark.parametrize(
    "text",
    ["", "  ", "abc", "0.005:", "0.005:abc", "0.005:1.5", "0.005:0", "0.005:-2", "-0.1", "0", "nan", "inf", "0.005,,1e-3",
     "0.005:100, 1e-3:50", "0.005:100, 1e-3:100", "0.005, 1e-3:100", "0.005:-1, 1e-3", "0.005:100:200"],
)  # fmt: skip
def test_malformed_schedules_are_refused(text):
    with pytest.raises(ValueError, match="^Invalid learning rate schedule: "):
        parse_schedule(text)


@given(st.text(alphabet="0123456789.,:-e xa", max_size=20))
def test_any_string_parses_or_raises_the_schedule_error(text):
    try:
        schedule = parse_schedule(text)
    except ValueError as error:
        assert str(error).startswith("Invalid learning rate schedule: ")
    else:
        steps = [until for _, until in schedule[:-1]]
        assert all(until is not None for until in steps) and steps == sorted(set(steps))
        assert all(rate > 0 for rate, _ in schedule)
