"""DiLoCo's settings (ringtrain.train.rounds.DiLoCo): what is refused, and how fragments cut
the parameters."""

from __future__ import annotations

import pytest

from ringtrain.errors import ConfigError
from ringtrain.train.fragments import split
from ringtrain.train.rounds import DiLoCo


@pytest.mark.parametrize("settings,message", [
    ({"inner_steps": 10, "fragments": 3}, "fragments must be a positive divisor of inner_steps"),
    ({"inner_steps": 10, "fragments": 0}, "fragments must be a positive divisor"),
    ({"fragments": True}, "fragments must be a positive divisor"),
    ({"inner_steps": 10, "fragments": 2, "round_seconds": 2.0}, "fragments need lockstep"),
    ({"inner_steps": 10, "fragments": 2, "average_inner_state": True},
     "fragments need lockstep"),
    ({"inner_steps": 0}, "inner_steps must be a positive integer"),
    ({"warmup_rounds": 2}, "warmup_rounds must be an integer in \\[0, 10\\], with round_seconds"),
    ({"warmup_rounds": -1, "round_seconds": 2.0}, "warmup_rounds must be"),
    ({"warmup_rounds": True, "round_seconds": 2.0}, "warmup_rounds must be"),
])
def test_bad_settings_are_refused_naming_what_is_wrong(settings, message):
    with pytest.raises(ConfigError, match=message):
        DiLoCo(**settings)


def test_fragments_cover_the_parameters_once_in_nearly_equal_parts():
    parts = split(10, 3)
    assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 6), (6, 10)]
    assert split(7, 1) == [slice(0, 7)]
    assert "fragments=4" in DiLoCo(inner_steps=8, fragments=4).spec()


def test_warmup_rounds_double_up_to_round_seconds_from_wherever_the_clock_starts():
    plain = DiLoCo(round_seconds=2.0)
    assert [plain.seconds_until(0, k) for k in (1, 2, 3)] == [2.0, 4.0, 6.0]
    warm = DiLoCo(round_seconds=2.0, warmup_rounds=2)
    assert [warm.seconds_until(0, k) for k in (1, 2, 3, 4)] == [0.5, 1.5, 3.5, 5.5]
    # a clock started at round 1 (a re-form) goes on with round 1's length, not round 0's
    assert [warm.seconds_until(1, k) for k in (1, 2, 3)] == [1.0, 3.0, 5.0]
    assert warm.seconds_until(7, 1) == 2.0
    assert "warmup_rounds=2" in warm.spec()


def test_a_joiner_takes_the_roots_inner_state_typed_as_its_own():
    import numpy as np

    from ringtrain.train.optim import Adam
    from ringtrain.train.rounds import _root_inner_state
    from ringtrain.train.sync import array_names

    params = np.zeros(3)
    mine, root = Adam(params.copy(), lr=0.1), Adam(params.copy(), lr=0.1)
    root.step(np.array([1.0, -2.0, 3.0]))
    root.step(np.array([0.5, 0.5, 0.5]))
    theirs = root.state_dict()
    names = array_names(theirs)
    scalars = sorted(name for name in theirs if name not in names)
    state = _root_inner_state(mine.state_dict(), names, scalars,
                              np.concatenate([theirs[name] for name in names]),
                              np.array([float(theirs[name]) for name in scalars]))
    mine.load_state_dict(state)
    for name, value in root.state_dict().items():
        np.testing.assert_array_equal(mine.state_dict()[name], value)
        assert type(mine.state_dict()[name]) is type(value)
